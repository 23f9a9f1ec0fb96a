//! The contract of [`DeadlineStore`], written once and generic over the
//! backend, instantiated per backend with [`deadline_store_tests!`]
//! (`tests/tests/deadline_stores.rs`).

use aftermath::process::{Deadline, DeadlineStore};
use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::Fresh;

/// A backend of the deadline suite.
#[async_trait::async_trait]
pub trait DeadlineBackend: Send + Sync + 'static {
    /// The store type.
    type Store: DeadlineStore + Clone;
    /// Name printed in skip messages.
    const NAME: &'static str;
    /// A fresh, empty store, or the reason the backend cannot run here.
    async fn open() -> Result<Fresh<Self::Store>, String>;
    /// The same storage opened anew after `store` (the last handle) is
    /// dropped, or `None` when the backend keeps nothing (memory).
    async fn reopen(store: Self::Store) -> Option<Self::Store>;
}

/// Opens a fresh deadline store or prints why the test is skipped.
pub async fn open_deadlines_or_skip<B: DeadlineBackend>(test: &str) -> Option<Fresh<B::Store>> {
    match B::open().await {
        Ok(fresh) => Some(fresh),
        Err(reason) => {
            crate::skip_notice!("SKIPPED {}::deadlines::{test}: {reason}", B::NAME);
            None
        }
    }
}

macro_rules! fresh {
    ($b:ty, $name:literal) => {
        match open_deadlines_or_skip::<$b>($name).await {
            Some(fresh) => fresh,
            None => return,
        }
    };
}

/// A fixed instant with whole microseconds (every backend stores those).
fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_750_000_000 + seconds, 0).expect("a valid time")
}

/// A deadline of `process`/`instance` named `name`, due at `at(seconds)`.
fn deadline(process: &str, instance: &str, name: &str, seconds: i64) -> Deadline {
    Deadline {
        process: process.to_owned(),
        instance: instance.to_owned(),
        id: Uuid::new_v4(),
        name: name.to_owned(),
        due_at: at(seconds),
    }
}

/// Sorted as `due` and `pending` promise: due time, then id.
fn by_due(mut deadlines: Vec<Deadline>) -> Vec<Deadline> {
    deadlines.sort_by_key(|d| (d.due_at, d.id));
    deadlines
}

async fn schedule_all<S: DeadlineStore>(store: &S, deadlines: &[Deadline]) {
    for d in deadlines {
        store.schedule(d).await.expect("schedule a deadline");
    }
}

/// Scheduling the same deadline again changes nothing; scheduling its id
/// with other values replaces the row (an upsert by `(process, id)`).
pub async fn schedule_is_an_idempotent_upsert<B: DeadlineBackend>() {
    let f = fresh!(B, "schedule_is_an_idempotent_upsert");
    let s = &f.store;
    let d = deadline("shipping", "order-1", "ship", 60);
    s.schedule(&d).await.unwrap();
    s.schedule(&d).await.unwrap();
    s.schedule(&d).await.unwrap();
    assert_eq!(
        s.pending("shipping", "order-1").await.unwrap(),
        vec![d.clone()]
    );
    assert_eq!(
        s.due("shipping", None, at(60), 10).await.unwrap(),
        vec![d.clone()]
    );

    let moved = Deadline {
        due_at: at(120),
        name: "ship-later".into(),
        ..d.clone()
    };
    s.schedule(&moved).await.unwrap();
    assert_eq!(
        s.pending("shipping", "order-1").await.unwrap(),
        vec![moved.clone()],
        "replaced, not added"
    );
    assert!(
        s.due("shipping", None, at(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.next_due("shipping", None).await.unwrap(), Some(at(120)));
}

/// `cancel` removes one deadline of one process; absent ids are no error.
pub async fn cancel_removes_one_deadline<B: DeadlineBackend>() {
    let f = fresh!(B, "cancel_removes_one_deadline");
    let s = &f.store;
    let a = deadline("shipping", "order-1", "ship", 10);
    let b = deadline("shipping", "order-1", "remind", 20);
    schedule_all(s, &[a.clone(), b.clone()]).await;
    s.cancel("shipping", a.id).await.unwrap();
    assert_eq!(
        s.pending("shipping", "order-1").await.unwrap(),
        vec![b.clone()]
    );
    // Again, an unknown id, and the right id under another process.
    s.cancel("shipping", a.id).await.unwrap();
    s.cancel("shipping", Uuid::new_v4()).await.unwrap();
    s.cancel("billing", b.id).await.unwrap();
    assert_eq!(
        s.pending("shipping", "order-1").await.unwrap(),
        vec![b.clone()]
    );
    s.cancel("shipping", b.id).await.unwrap();
    assert!(s.pending("shipping", "order-1").await.unwrap().is_empty());
    assert_eq!(s.next_due("shipping", None).await.unwrap(), None);
}

/// `cancel_instance` removes every deadline of one instance of one process.
pub async fn cancel_instance_removes_its_deadlines<B: DeadlineBackend>() {
    let f = fresh!(B, "cancel_instance_removes_its_deadlines");
    let s = &f.store;
    let mine = vec![
        deadline("shipping", "order-1", "ship", 30),
        deadline("shipping", "order-1", "remind", 10),
        deadline("shipping", "order-1", "escalate", 20),
    ];
    let sibling = deadline("shipping", "order-2", "ship", 5);
    let namesake = deadline("billing", "order-1", "charge", 1);
    schedule_all(s, &mine).await;
    schedule_all(s, &[sibling.clone(), namesake.clone()]).await;
    assert_eq!(
        s.pending("shipping", "order-1").await.unwrap(),
        by_due(mine.clone())
    );
    s.cancel_instance("shipping", "order-1").await.unwrap();
    assert!(s.pending("shipping", "order-1").await.unwrap().is_empty());
    assert_eq!(
        s.pending("shipping", "order-2").await.unwrap(),
        vec![sibling.clone()]
    );
    assert_eq!(
        s.pending("billing", "order-1").await.unwrap(),
        vec![namesake]
    );
    assert_eq!(
        s.due("shipping", None, at(100), 10).await.unwrap(),
        vec![sibling]
    );
    // Nothing left to cancel: no error.
    s.cancel_instance("shipping", "order-1").await.unwrap();
    s.cancel_instance("shipping", "never-was").await.unwrap();
}

/// `due` lists what is due at `now` (inclusive), earliest first, ties by
/// id, at most `limit`.
pub async fn due_is_ordered_and_limited<B: DeadlineBackend>() {
    let f = fresh!(B, "due_is_ordered_and_limited");
    let s = &f.store;
    let mut all = Vec::new();
    // Out of order, with ties on due time, across instances.
    for (i, seconds) in [50, 10, 30, 10, 40, 10, 20, 30, 90, 60]
        .into_iter()
        .enumerate()
    {
        all.push(deadline(
            "shipping",
            &format!("order-{}", i % 3),
            "t",
            seconds,
        ));
    }
    schedule_all(s, &all).await;
    let sorted = by_due(all.clone());
    let due_at_30: Vec<Deadline> = sorted
        .iter()
        .filter(|d| d.due_at <= at(30))
        .cloned()
        .collect();
    assert_eq!(due_at_30.len(), 6);
    assert_eq!(
        s.due("shipping", None, at(30), 100).await.unwrap(),
        due_at_30,
        "due at or before now, by due time then id"
    );
    assert_eq!(
        s.due("shipping", None, at(30), 4).await.unwrap(),
        due_at_30[..4].to_vec()
    );
    assert_eq!(
        s.due("shipping", None, at(30), 1).await.unwrap(),
        due_at_30[..1].to_vec()
    );
    assert!(s.due("shipping", None, at(30), 0).await.unwrap().is_empty());
    assert!(
        s.due("shipping", None, at(9), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.due("shipping", None, at(30) + Duration::microseconds(1), 100)
            .await
            .unwrap(),
        due_at_30
    );
    assert_eq!(
        s.due("shipping", None, at(30) - Duration::microseconds(1), 100)
            .await
            .unwrap(),
        sorted[..4].to_vec(),
        "a deadline is not due a microsecond early"
    );
    assert_eq!(
        s.due("shipping", None, at(1000), 100).await.unwrap(),
        sorted
    );
    assert!(
        s.due("nobody", None, at(1000), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

/// `next_due` is the earliest pending due time of the process, if any.
pub async fn next_due_is_the_earliest<B: DeadlineBackend>() {
    let f = fresh!(B, "next_due_is_the_earliest");
    let s = &f.store;
    assert_eq!(s.next_due("shipping", None).await.unwrap(), None);
    let late = deadline("shipping", "order-1", "late", 300);
    let early = deadline("shipping", "order-2", "early", -30);
    let middle = deadline("shipping", "order-1", "middle", 100);
    schedule_all(s, &[late.clone(), early.clone(), middle.clone()]).await;
    assert_eq!(s.next_due("shipping", None).await.unwrap(), Some(at(-30)));
    s.cancel("shipping", early.id).await.unwrap();
    assert_eq!(s.next_due("shipping", None).await.unwrap(), Some(at(100)));
    s.cancel_instance("shipping", "order-1").await.unwrap();
    assert_eq!(s.next_due("shipping", None).await.unwrap(), None);
}

/// `pending` lists one instance's deadlines, earliest first.
pub async fn pending_lists_one_instance<B: DeadlineBackend>() {
    let f = fresh!(B, "pending_lists_one_instance");
    let s = &f.store;
    let mine = vec![
        deadline("shipping", "order-1", "c", 30),
        deadline("shipping", "order-1", "a", 10),
        deadline("shipping", "order-1", "b", 10),
    ];
    let theirs = deadline("shipping", "order-10", "a", 5);
    schedule_all(s, &mine).await;
    s.schedule(&theirs).await.unwrap();
    assert_eq!(
        s.pending("shipping", "order-1").await.unwrap(),
        by_due(mine)
    );
    assert_eq!(
        s.pending("shipping", "order-10").await.unwrap(),
        vec![theirs]
    );
    assert!(s.pending("shipping", "order-").await.unwrap().is_empty());
    assert!(s.pending("billing", "order-1").await.unwrap().is_empty());
}

/// Process names partition everything: the same instance names and even
/// the same deadline ids in two processes never see each other.
pub async fn processes_are_isolated<B: DeadlineBackend>() {
    let f = fresh!(B, "processes_are_isolated");
    let s = &f.store;
    let shipping = deadline("shipping", "order-1", "t", 10);
    let billing = Deadline {
        process: "billing".into(),
        due_at: at(20),
        ..shipping.clone()
    };
    schedule_all(s, &[shipping.clone(), billing.clone()]).await;
    assert_eq!(
        s.pending("shipping", "order-1").await.unwrap(),
        vec![shipping.clone()]
    );
    assert_eq!(
        s.pending("billing", "order-1").await.unwrap(),
        vec![billing.clone()]
    );
    assert_eq!(
        s.due("shipping", None, at(100), 10).await.unwrap(),
        vec![shipping.clone()]
    );
    assert_eq!(
        s.due("billing", None, at(100), 10).await.unwrap(),
        vec![billing.clone()]
    );
    assert_eq!(s.next_due("billing", None).await.unwrap(), Some(at(20)));
    // Rescheduling one process's id leaves the other's alone.
    let moved = Deadline {
        due_at: at(5),
        ..shipping.clone()
    };
    s.schedule(&moved).await.unwrap();
    assert_eq!(
        s.pending("billing", "order-1").await.unwrap(),
        vec![billing.clone()]
    );
    s.cancel("shipping", shipping.id).await.unwrap();
    assert_eq!(
        s.pending("billing", "order-1").await.unwrap(),
        vec![billing.clone()]
    );
    s.schedule(&moved).await.unwrap();
    s.cancel_instance("billing", "order-1").await.unwrap();
    assert_eq!(s.pending("shipping", "order-1").await.unwrap(), vec![moved]);
    assert_eq!(s.next_due("billing", None).await.unwrap(), None);
}

/// Deadlines are durable: the storage opened anew has them (backends that
/// keep nothing skip this).
pub async fn deadlines_survive_reopening<B: DeadlineBackend>() {
    let Fresh { store, guard } = fresh!(B, "deadlines_survive_reopening");
    let kept = vec![
        deadline("shipping", "order-1", "ship", 10),
        deadline("shipping", "order-2", "ship", 20),
        deadline("billing", "order-1", "charge", 15),
    ];
    let cancelled = deadline("shipping", "order-1", "remind", 5);
    schedule_all(&store, &kept).await;
    store.schedule(&cancelled).await.unwrap();
    store.cancel("shipping", cancelled.id).await.unwrap();
    let Some(store) = B::reopen(store).await else {
        return;
    };
    assert_eq!(
        store.due("shipping", None, at(100), 10).await.unwrap(),
        vec![kept[0].clone(), kept[1].clone()]
    );
    assert_eq!(store.next_due("billing", None).await.unwrap(), Some(at(15)));
    assert_eq!(
        store.pending("billing", "order-1").await.unwrap(),
        vec![kept[2].clone()]
    );
    drop(store);
    drop(guard);
}

/// With a partition, `due` and `next_due` see only the deadlines of the
/// instances in it (by their stream's hash), and every deadline is in
/// exactly one partition of a count.
pub async fn due_by_partition<B: DeadlineBackend>() {
    use aftermath::subscription::Partition;
    let Fresh { store, guard } = fresh!(B, "due_by_partition");
    let all: Vec<Deadline> = (0..40)
        .map(|i| deadline("shipping", &format!("order-{i}"), "ship", i))
        .collect();
    schedule_all(&store, &all).await;
    let count = 4;
    let mut seen = Vec::new();
    for index in 0..count {
        let p = Partition::new(index, count);
        let due = store.due("shipping", Some(p), at(100), 100).await.unwrap();
        let expected: Vec<Deadline> = all
            .iter()
            .filter(|d| p.contains_hash(d.instance_hash()))
            .cloned()
            .collect();
        assert!(
            !expected.is_empty(),
            "40 instances fill every one of 4 partitions"
        );
        assert_eq!(
            due, expected,
            "partition {p}: its own deadlines, earliest first"
        );
        assert_eq!(
            store.next_due("shipping", Some(p)).await.unwrap(),
            Some(expected[0].due_at),
            "partition {p}"
        );
        // A limit counts only the partition's deadlines.
        assert_eq!(
            store.due("shipping", Some(p), at(100), 1).await.unwrap(),
            vec![expected[0].clone()]
        );
        seen.extend(due);
    }
    seen.sort_by_key(|d| d.due_at);
    assert_eq!(seen, all, "every deadline in exactly one partition");
    drop(store);
    drop(guard);
}

/// Instantiates every deadline store test for a [`DeadlineBackend`] as
/// `#[tokio::test]`s.
#[macro_export]
macro_rules! deadline_store_tests {
    ($backend:ty) => {
        $crate::deadline_store_tests!(@each $backend;
            schedule_is_an_idempotent_upsert,
            cancel_removes_one_deadline,
            cancel_instance_removes_its_deadlines,
            due_is_ordered_and_limited,
            next_due_is_the_earliest,
            pending_lists_one_instance,
            processes_are_isolated,
            deadlines_survive_reopening,
            due_by_partition,
        );
    };
    (@each $backend:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::deadlines::$name::<$backend>().await;
            }
        )*
    };
}
