//! The `warehouse` service of the two-service example (see
//! `aftermath_examples::two_services`): `warehouse serve <db> <nats url> <prefix>`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    aftermath_examples::two_services::warehouse_main()
}
