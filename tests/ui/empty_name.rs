use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "account")]
enum AccountEvent {
    #[event(name = "")]
    Opened { owner: String },
    #[event(alias = "  ")]
    Closed,
}

fn main() {}
