use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "account")]
enum AccountEvent {
    Deposited {
        amount: u64,
    },
    #[event(name = "Deposited")]
    Credited {
        amount: u64,
    },
}

fn main() {}
