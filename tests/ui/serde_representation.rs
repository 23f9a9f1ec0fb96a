use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[serde(tag = "type")]
#[event(prefix = "account")]
enum AccountEvent {
    Opened { owner: String },
}

#[derive(Serialize, Deserialize, Event)]
#[serde(untagged)]
#[event(prefix = "order")]
enum OrderEvent {
    Placed(u32),
}

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "cart")]
enum CartEvent {
    Cleared,
    #[serde(skip_deserializing)]
    Abandoned,
}

fn main() {}
