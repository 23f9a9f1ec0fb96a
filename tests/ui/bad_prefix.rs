use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "account.")]
enum TrailingDot {
    Opened,
}

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "my account")]
enum Spaced {
    Opened,
}

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "a", prefix = "b")]
enum Twice {
    Opened,
}

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum OnVariant {
    #[event(prefix = "line")]
    Added,
}

fn main() {}
