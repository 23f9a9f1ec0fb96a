//! An effect released by an operator retry whose run stops before `Done`
//! (the checkpoint is already past it) runs again, with the same key, before
//! the events held behind it: nothing is lost, per-stream order is kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aftermath::reactor::testkit::{Faults, FaultyJournal, Step};
use aftermath::reactor::{
    EffectContext, EffectJournal, EffectState, MemoryJournal, ReactError, Reactor, ReactorRunner,
};
use aftermath::subscription::MemoryCheckpoints;
use aftermath::{EventData, EventStore, ExpectedVersion, MemoryStore, Metadata, Recorded};
use aftermath_tests::domain::AccountEvent;
use uuid::Uuid;

#[derive(Clone, Default)]
struct Payouts {
    refuse_first: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<(u64, String)>>>,
}

#[async_trait::async_trait]
impl Reactor for Payouts {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        "payouts"
    }
    async fn react(
        &self,
        event: &Recorded<AccountEvent>,
        ctx: &EffectContext,
    ) -> Result<(), ReactError> {
        let AccountEvent::Deposited { amount } = event.event else {
            return Ok(());
        };
        if amount == 1 && self.refuse_first.load(Ordering::SeqCst) {
            return Err(ReactError::fatal("refused"));
        }
        self.calls
            .lock()
            .unwrap()
            .push((amount, ctx.idempotency_key.clone()));
        Ok(())
    }
}

fn deposit(amount: u64) -> EventData {
    EventData::encode(
        &AccountEvent::Deposited { amount },
        Uuid::now_v7(),
        Metadata::caused_by(Uuid::now_v7()),
    )
    .unwrap()
}

#[tokio::test]
async fn released_effect_interrupted_before_done_runs_again_before_held_events() {
    let store = MemoryStore::new();
    let (e1, e2) = (deposit(1), deposit(2));
    let (id1, id2) = (e1.id, e2.id);
    store
        .append("account-s", ExpectedVersion::NoStream, vec![e1, e2])
        .await
        .unwrap();

    let reactor = Payouts::default();
    reactor.refuse_first.store(true, Ordering::SeqCst);
    let faults = Faults::new();
    let journal = FaultyJournal::new(MemoryJournal::new(), faults.clone());
    let runner = ReactorRunner::new(
        reactor.clone(),
        store.clone(),
        journal,
        MemoryCheckpoints::new(),
    );

    runner.catch_up().await.unwrap();
    let states = runner.journal().load("payouts", &[id1, id2]).await.unwrap();
    assert_eq!(
        (states[&id1].state, states[&id2].state),
        (EffectState::Parked, EffectState::Blocked)
    );

    // The operator fixes the cause and retries; the Done write of that retry fails.
    reactor.refuse_first.store(false, Ordering::SeqCst);
    assert!(runner.journal().retry("payouts", id1).await.unwrap());
    faults.add(Step::AfterCall, faults.seen(Step::AfterCall) + 1);
    assert!(
        runner.catch_up().await.is_err(),
        "the injected Done failure stops the run"
    );
    assert_eq!(
        runner.journal().load("payouts", &[id1]).await.unwrap()[&id1].state,
        EffectState::Started
    );

    // The next run finishes the released effect first, then the held one.
    runner.catch_up().await.unwrap();
    let states = runner.journal().load("payouts", &[id1, id2]).await.unwrap();
    assert_eq!(
        (states[&id1].state, states[&id2].state),
        (EffectState::Done, EffectState::Done)
    );
    let calls = reactor.calls.lock().unwrap().clone();
    let amounts: Vec<u64> = calls.iter().map(|(a, _)| *a).collect();
    assert_eq!(
        amounts,
        vec![1, 1, 2],
        "E1 again (same key) before E2: per-stream order kept"
    );
    assert_eq!(
        calls[0].1, calls[1].1,
        "the repeat carries the same idempotency key"
    );
}
