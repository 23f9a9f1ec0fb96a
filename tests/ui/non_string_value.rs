use aftermath::Event;
use serde::{Deserialize, Serialize};

const NAME: &str = "AccountOpened";

#[derive(Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(name = NAME)]
    Opened { owner: String },
}

#[derive(Serialize, Deserialize, Event)]
enum OrderEvent {
    #[event(alias = 3)]
    Placed,
}

#[derive(Serialize, Deserialize, Event)]
enum CartEvent {
    #[event(name)]
    Cleared,
}

fn main() {}
