use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "account")]
enum AccountEvent {
    #[event(name = "AccountOpened")]
    #[event(name = "Opened")]
    Opened { owner: String },
}

fn main() {}
