//! The `orders` service of the two-service example (see
//! `aftermath_examples::two_services`): `orders serve <db> <nats url>
//! <prefix> <orders>`, or `orders demo [<orders> [<kill rounds>]]`, which
//! runs both services (the `warehouse` binary must be built beside it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    aftermath_examples::two_services::orders_main()
}
