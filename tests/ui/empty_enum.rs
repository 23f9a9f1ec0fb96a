use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum NothingHappens {}

fn main() {}
