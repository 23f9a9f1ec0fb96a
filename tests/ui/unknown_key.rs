use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "account")]
enum AccountEvent {
    #[event(rename = "AccountOpened")]
    Opened { owner: String },
}

fn main() {}
