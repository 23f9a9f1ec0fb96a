use aftermath::{Event, EventUnion};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum OrderEvent {
    Placed { items: u32 },
}

#[derive(EventUnion)]
enum FulfillmentInput<T> {
    Order(OrderEvent),
    Other(T),
}

fn main() {}
