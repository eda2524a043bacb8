//! The writer's batch statements, checked directly against the database layer on both backends:
//! each kind of row (notifications, deliveries, marks, acks, last-seen) is written by one
//! statement per batch, and an ack that arrives before its delivery mark stands for the mark;
//! a batch's posts for different devices each keep their own seq, and no seq is handed out twice,
//! even after the newest notifications are purged.

use herald::db::batch::{self, PostInput, PostOutcome, PostRejection, WriteBatch};
use herald::db::queries::{self, DeviceRow, STATE_ACKED, STATE_DELIVERED, STATE_PENDING};
use herald::db::Backend as DbBackend;

use crate::both_backends;
use crate::helpers::{Backend, TestDb};

both_backends!(a_batch_writes_posts_marks_acks_and_last_seen_in_order);
both_backends!(posts_for_many_devices_keep_their_own_seqs_and_a_purged_seq_is_never_reused);

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

fn device_of(id: &str, user: &str) -> DeviceRow {
    DeviceRow {
        user_id: user.into(),
        ..device(id)
    }
}

fn post_to(id: &str, devices: &[&str], users: &[&str]) -> PostInput {
    PostInput {
        user_ids: users.iter().map(|u| u.to_string()).collect(),
        device_ids: devices.iter().map(|d| d.to_string()).collect(),
        ..post(id, "unused", &format!(r#"{{"for":"{id}"}}"#))
    }
}

fn created_seqs(out: &batch::BatchResult) -> Vec<Option<i64>> {
    out.posts
        .iter()
        .map(|p| match p {
            PostOutcome::Created { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
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
    let seqs: Vec<i64> = created_seqs(&out)
        .into_iter()
        .map(|seq| seq.unwrap_or_else(|| panic!("not all created: {:?}", out.posts)))
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

/// A post's id, its device and user targets, and the devices it must reach.
type Planned = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
);

/// One batch whose posts go to different devices (by device id, by user, several at once, to a
/// user with no devices) with a rejected post among them: every delivery is stored under its
/// own post's seq, and replay finds each device's posts and only those. Then the newest posts are
/// purged and later ones must still get new, higher seqs: a reused seq would let a device that
/// acked up to it skip the new post, and another node's `seq`-ordered catch-up miss it.
async fn posts_for_many_devices_keep_their_own_seqs_and_a_purged_seq_is_never_reused(b: Backend) {
    let db = TestDb::new(b);
    let backend = DbBackend::from_url(&db.url).unwrap();
    backend.migrate().unwrap();
    let mut c = backend.connect().unwrap();
    for row in [
        device("d1"),
        device("d2"),
        device_of("d3", "family"),
        device_of("d4", "family"),
    ] {
        queries::insert_device(&mut c, &row).unwrap();
    }

    let plan: Vec<Planned> = vec![
        // (id, device targets, user targets, devices it must reach)
        ("p1", &["d1"], &[], &["d1"]),
        ("p2", &[], &["user-of-d2"], &["d2"]),
        ("p3", &["d2", "d1"], &[], &["d1", "d2"]),
        ("p4", &["d1", "ghost"], &[], &[]), // rejected: names an unknown device
        ("p5", &["d3"], &["family"], &["d3", "d4"]),
        ("p6", &[], &["nobody"], &[]),
        ("p7", &["d4"], &[], &["d4"]),
    ];
    let posts = plan
        .iter()
        .map(|(id, devices, users, _)| post_to(id, devices, users))
        .collect();
    let out = batch::commit(
        &mut c,
        &WriteBatch {
            posts,
            ..WriteBatch::default()
        },
        1_000,
    )
    .unwrap();
    let seqs = created_seqs(&out);
    match &out.posts[3] {
        PostOutcome::Rejected(PostRejection::UnknownDevices(ids)) => {
            assert_eq!(ids, &vec!["ghost".to_string()])
        }
        other => panic!("p4 was not refused: {other:?}"),
    }
    let made: Vec<i64> = seqs.iter().flatten().copied().collect();
    assert_eq!(made.len(), 6, "{:?}", out.posts);
    assert!(made.windows(2).all(|w| w[0] < w[1]), "{made:?}");
    for ((id, _, _, reach), seq) in plan.iter().zip(&seqs) {
        let Some(seq) = *seq else {
            assert!(queries::notification_by_id(&mut c, id).unwrap().is_none());
            continue;
        };
        let row = queries::notification_by_id(&mut c, id).unwrap().unwrap();
        assert_eq!(row.seq, seq, "{id}");
        assert_eq!(row.payload, format!(r#"{{"for":"{id}"}}"#));
        assert_eq!(row.device_count as usize, reach.len(), "{id}");
        let got: Vec<String> = queries::deliveries_of(&mut c, seq)
            .unwrap()
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        assert_eq!(got, reach.to_vec(), "deliveries of {id} (seq {seq})");
    }
    let replay = |c: &mut _, d: &str| -> Vec<String> {
        queries::pending_for_device(c, d, 0, 1_500, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(replay(&mut c, "d1"), ["p1", "p3"]);
    assert_eq!(replay(&mut c, "d2"), ["p2", "p3"]);
    assert_eq!(replay(&mut c, "d3"), ["p5"]);
    assert_eq!(replay(&mut c, "d4"), ["p5", "p7"]);

    // Purge the two newest (as expiry would) and post again: the new seqs start above every seq
    // ever handed out, and each new post still reaches its own device.
    let newest = *made.last().unwrap();
    let second = made[made.len() - 2];
    assert_eq!(
        queries::delete_notifications(&mut c, &[second, newest]).unwrap(),
        1, // p6 had no deliveries; p7's one, to d4, was unacked
    );
    let out = batch::commit(
        &mut c,
        &WriteBatch {
            posts: vec![post_to("q1", &["d4"], &[]), post_to("q2", &["d1"], &[])],
            ..WriteBatch::default()
        },
        2_000,
    )
    .unwrap();
    let again: Vec<i64> = created_seqs(&out).into_iter().map(Option::unwrap).collect();
    assert!(
        again[0] > newest && again[1] > again[0],
        "{again:?} after {made:?}"
    );
    assert_eq!(replay(&mut c, "d4"), ["p5", "q1"]);
    assert_eq!(replay(&mut c, "d1"), ["p1", "p3", "q2"]);

    // Everything purged: the next seq is still new.
    let all: Vec<i64> = made[..made.len() - 2]
        .iter()
        .chain(&again)
        .copied()
        .collect();
    queries::delete_notifications(&mut c, &all).unwrap();
    let out = batch::commit(
        &mut c,
        &WriteBatch {
            posts: vec![post_to("r1", &["d2"], &[])],
            ..WriteBatch::default()
        },
        3_000,
    )
    .unwrap();
    let last = created_seqs(&out)[0].unwrap();
    assert!(
        last > again[1],
        "{last} reuses a seq (newest before: {})",
        again[1]
    );
    assert_eq!(replay(&mut c, "d2"), ["r1"]);
}
