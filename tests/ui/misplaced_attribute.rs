use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(name = "Account")]
#[event(prefix = "account")]
enum AccountEvent {
    Opened {
        #[event(name = "who")]
        owner: String,
    },
}

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum OrderEvent {
    #[event]
    Placed,
}

fn main() {}
