use aftermath::{Event, EventUnion};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum OrderEvent {
    Placed { items: u32 },
}

// Another enum that writes under the same prefix: its `Placed` is stored as
// "order.Placed" too, so a reader of both could not tell them apart.
#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum LegacyOrderEvent {
    Placed { count: u32 },
}

#[derive(EventUnion)]
enum FulfillmentInput {
    Order(OrderEvent),
    Legacy(LegacyOrderEvent),
}

fn main() {}
