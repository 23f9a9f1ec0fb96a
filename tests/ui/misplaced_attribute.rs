use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(name = "Account")]
enum AccountEvent {
    Opened {
        #[event(name = "who")]
        owner: String,
    },
}

#[derive(Serialize, Deserialize, Event)]
enum OrderEvent {
    #[event]
    Placed,
}

fn main() {}
