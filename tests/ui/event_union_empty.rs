use aftermath::EventUnion;

#[derive(EventUnion)]
enum FulfillmentInput {}

fn main() {}
