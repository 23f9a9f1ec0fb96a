use aftermath::Event;
use serde::{Deserialize, Serialize};

const NAME: &str = "AccountOpened";

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "account")]
enum AccountEvent {
    #[event(name = NAME)]
    Opened { owner: String },
}

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum OrderEvent {
    #[event(alias = 3)]
    Placed,
}

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "cart")]
enum CartEvent {
    #[event(name)]
    Cleared,
}

fn main() {}
