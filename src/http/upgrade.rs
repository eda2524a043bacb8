//! The upgrade service: where actix-http sends every request that asks for a WebSocket.
//!
//! The request goes through the same [`App`] as any other (routing, middleware, authentication,
//! limits, errors as JSON). If the `/v1/ws` handler accepts it, its `101` carries a
//! [`Handover`]: the `101` is written here, the HTTP layer lets go of the socket (and of its
//! buffers), and the session takes the socket over. Any other answer is written as is and the
//! connection is closed, since a client that asked to switch protocols is not speaking plain
//! HTTP/1.1 after its request.

use std::io;
use std::rc::Rc;

use actix_codec::Framed;
use actix_http::body::{self, BodySize, MessageBody};
use actix_http::{h1, ConnectionType, HttpMessage, Request, Response, StatusCode};
use actix_service::{fn_factory, fn_service, Service, ServiceFactory};
use actix_web::dev::{AppConfig, ServiceRequest, ServiceResponse};
use actix_web::rt::net::TcpStream;
use actix_web::App;
use futures_util::SinkExt;

use crate::actors::socket::{Handover, UpgradeRequest};

type Upgraded = (Request, Framed<TcpStream, h1::Codec>);

/// The upgrade service for one worker, around its own instance of `app`.
pub fn service<T, B>(
    app: App<T>,
) -> impl ServiceFactory<Upgraded, Config = (), Response = (), Error = actix_web::Error, InitError = ()>
where
    T: ServiceFactory<
            ServiceRequest,
            Config = (),
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: MessageBody + 'static,
{
    let app = actix_service::map_config(app, |_| AppConfig::default());
    fn_factory(move || {
        let app = app.new_service(());
        async move {
            let app = Rc::new(app.await?);
            Ok(fn_service(move |(req, framed): Upgraded| {
                let app = app.clone();
                async move {
                    // The client went away mid-handshake: nothing to report but at debug.
                    if let Err(e) = answer(&*app, req, framed).await {
                        log::debug!("WebSocket handshake not completed: {e}");
                    }
                    Ok(())
                }
            }))
        }
    })
}

async fn answer<S, B>(
    app: &S,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) -> io::Result<()>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    req.extensions_mut().insert(UpgradeRequest);
    let mut res: Response<body::BoxBody> = match app.call(req).await {
        Ok(res) => res.map_into_boxed_body().into(),
        Err(e) => e.error_response().into(),
    };
    let handover = res.extensions_mut().remove::<Handover>();
    let (mut head, body) = res.into_parts();
    match handover {
        Some(Handover(start)) if head.status() == StatusCode::SWITCHING_PROTOCOLS => {
            framed
                .send(h1::Message::Item((head, BodySize::None)))
                .await?;
            let parts = framed.into_parts();
            start(parts.io, &parts.read_buf);
        }
        _ => {
            head.head_mut().set_connection_type(ConnectionType::Close);
            let bytes = body::to_bytes(body)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            framed
                .send(h1::Message::Item((
                    head,
                    BodySize::Sized(bytes.len() as u64),
                )))
                .await?;
            if !bytes.is_empty() {
                framed.send(h1::Message::Chunk(Some(bytes))).await?;
            }
            SinkExt::<h1::Message<(Response<()>, BodySize)>>::close(&mut framed).await?;
        }
    }
    Ok(())
}
