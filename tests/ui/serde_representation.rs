use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[serde(tag = "type")]
enum AccountEvent {
    Opened { owner: String },
}

#[derive(Serialize, Deserialize, Event)]
#[serde(untagged)]
enum OrderEvent {
    Placed(u32),
}

#[derive(Serialize, Deserialize, Event)]
enum CartEvent {
    Cleared,
    #[serde(skip_deserializing)]
    Abandoned,
}

fn main() {}
