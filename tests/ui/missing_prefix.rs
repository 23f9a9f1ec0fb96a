use aftermath::Event;
use serde::{Deserialize, Serialize};

// Stored names are `<prefix>.<name>`; the prefix is written out.
#[derive(Serialize, Deserialize, Event)]
enum OrderLineEvent {
    Added { sku: String },
}

fn main() {}
