use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(rename = "AccountOpened")]
    Opened { owner: String },
}

fn main() {}
