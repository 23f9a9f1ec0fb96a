use aftermath::{Event, EventUnion};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum OrderEvent {
    Placed { items: u32 },
}

#[derive(Serialize, Deserialize, Event)]
enum PaymentEvent {
    Captured { cents: u64 },
}

#[derive(EventUnion)]
enum FulfillmentInput {
    Order(OrderEvent),
    Payment(PaymentEvent),
    Reorder(OrderEvent),
}

fn main() {}
