//! The two-service example's `orders` binary, built in this package for
//! `tests/two_services.rs` (the same code: `two_services::orders_main`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    aftermath_examples::two_services::orders_main()
}
