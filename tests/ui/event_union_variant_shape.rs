use aftermath::{Event, EventUnion};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "order")]
enum OrderEvent {
    Placed { items: u32 },
}

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "payment")]
enum PaymentEvent {
    Captured { cents: u64 },
}

#[derive(EventUnion)]
enum FulfillmentInput {
    Order(OrderEvent),
    Started,
    Payment { event: PaymentEvent },
    Both(OrderEvent, PaymentEvent),
    Nothing(),
}

fn main() {}
