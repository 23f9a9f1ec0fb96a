use aftermath::Event;
use serde::{Deserialize, Serialize};

// An alias may not be another variant's name...
#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "account")]
enum AccountEvent {
    Opened {
        owner: String,
    },
    #[event(name = "Withdrawn", alias = "Opened")]
    Withdrew {
        amount: u64,
    },
}

// ...nor another variant's alias.
#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum OrderEvent {
    #[event(alias = "Created")]
    Placed,
    #[event(alias = "Dropped")]
    #[event(alias = "Created")]
    Cancelled,
}

// ...nor repeat within one variant.
#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "cart")]
enum CartEvent {
    #[event(alias = "Cleared")]
    Cleared,
    #[event(alias = "Added", alias = "Added")]
    ItemAdded,
}

fn main() {}
