//! The writer's batch statements, checked directly against the database layer on both backends:
//! each kind of row (notifications, deliveries, marks, acks, last-seen) is written by one
//! statement per batch, and an ack that arrives before its delivery mark stands for the mark.

use herald::db::batch::{self, PostInput, PostOutcome, WriteBatch};
use herald::db::queries::{self, DeviceRow, STATE_ACKED, STATE_DELIVERED, STATE_PENDING};
use herald::db::Backend as DbBackend;

use crate::both_backends;
use crate::helpers::{Backend, TestDb};

both_backends!(a_batch_writes_posts_marks_acks_and_last_seen_in_order);

fn device(id: &str) -> DeviceRow {
    DeviceRow {
        id: id.into(),
        user_id: format!("user-of-{id}"),
        name: id.into(),
        token_hash: format!("hash-of-{id}"),
        created_at: 1,
        revoked_at: None,
        last_seen: None,
    }
}

fn post(id: &str, device: &str, payload: &str) -> PostInput {
    PostInput {
        id: id.into(),
        poster: "svc".into(),
        idempotency_key: None,
        request_hash: None,
        user_ids: vec![],
        device_ids: vec![device.into()],
        payload: payload.into(),
        ttl_ms: 60_000,
    }
}

async fn a_batch_writes_posts_marks_acks_and_last_seen_in_order(b: Backend) {
    let db = TestDb::new(b);
    let backend = DbBackend::from_url(&db.url).unwrap();
    backend.migrate().unwrap();
    let mut c = backend.connect().unwrap();
    queries::insert_device(&mut c, &device("d1")).unwrap();
    queries::insert_device(&mut c, &device("d2")).unwrap();

    // Three posts in one batch: seqs follow the batch's order; payloads come back byte for byte
    // (quotes, backslashes and non-ASCII survive the JSON array the batch travels in).
    let payloads = [
        r#"{"a":1}"#,
        r#""quote \" and \\ backslash""#,
        r#"["é","☃"]"#,
    ];
    let posts = vec![
        post("n1", "d1", payloads[0]),
        post("n2", "d1", payloads[1]),
        post("n3", "d1", payloads[2]),
    ];
    let out = batch::commit(
        &mut c,
        &WriteBatch {
            posts,
            ..WriteBatch::default()
        },
        100,
    )
    .unwrap();
    let seqs: Vec<i64> = out
        .posts
        .iter()
        .map(|p| match p {
            PostOutcome::Created { seq, .. } => *seq,
            other => panic!("not created: {other:?}"),
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    for (i, id) in ["n1", "n2", "n3"].iter().enumerate() {
        let row = queries::notification_by_id(&mut c, id).unwrap().unwrap();
        assert_eq!(row.seq, seqs[i]);
        assert_eq!(row.payload, payloads[i]);
        let d = queries::deliveries_of(&mut c, row.seq).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].device_id.as_str(), d[0].state), ("d1", STATE_PENDING));
    }

    // n2 is marked delivered at 150; then one batch acks n1 (never marked) and n2, marks n1
    // (the mark arrived late), and carries acks that must change nothing: another device's, an
    // unknown id.
    let out = batch::commit(
        &mut c,
        &WriteBatch {
            delivered: vec![("d1".into(), vec![seqs[1]])],
            ..WriteBatch::default()
        },
        150,
    )
    .unwrap();
    assert_eq!((out.delivered, out.acked), (1, 0));
    let out = batch::commit(
        &mut c,
        &WriteBatch {
            acks: vec![
                ("d1".into(), vec!["n1".into(), "n2".into(), "nope".into()]),
                ("d2".into(), vec!["n3".into()]),
            ],
            delivered: vec![("d1".into(), vec![seqs[0]])],
            seen: vec![("d1".into(), 170), ("d1".into(), 190), ("d2".into(), 160)],
            ..WriteBatch::default()
        },
        200,
    )
    .unwrap();
    // Two acked; n1 counts as delivered once, by its ack (the late mark finds it acked).
    assert_eq!((out.acked, out.delivered), (2, 1));
    let state = |c: &mut _, seq| {
        let d = queries::deliveries_of(c, seq).unwrap();
        (d[0].state, d[0].delivered_at, d[0].acked_at)
    };
    assert_eq!(state(&mut c, seqs[0]), (STATE_ACKED, Some(200), Some(200)));
    assert_eq!(state(&mut c, seqs[1]), (STATE_ACKED, Some(150), Some(200)));
    assert_eq!(state(&mut c, seqs[2]), (STATE_PENDING, None, None));

    // A mark for n3, and an ack that repeats n1: only n3 changes.
    let out = batch::commit(
        &mut c,
        &WriteBatch {
            acks: vec![("d1".into(), vec!["n1".into()])],
            delivered: vec![("d1".into(), vec![seqs[2], seqs[0]])],
            ..WriteBatch::default()
        },
        300,
    )
    .unwrap();
    assert_eq!((out.acked, out.delivered), (0, 1));
    assert_eq!(state(&mut c, seqs[2]), (STATE_DELIVERED, Some(300), None));
    assert_eq!(state(&mut c, seqs[0]), (STATE_ACKED, Some(200), Some(200)));

    // Last seen: the latest time given for each device wins.
    let seen: Vec<(String, Option<i64>)> = ["d1", "d2"]
        .iter()
        .map(|id| {
            let d = queries::devices_of_user(&mut c, &format!("user-of-{id}")).unwrap();
            (d[0].id.clone(), d[0].last_seen)
        })
        .collect();
    assert_eq!(
        seen,
        vec![("d1".into(), Some(190)), ("d2".into(), Some(160))]
    );
}
