use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "account")]
enum AccountEvent<'a> {
    Opened { owner: &'a str },
}

fn main() {}
