use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
struct Deposited {
    amount: u64,
}

fn main() {}
