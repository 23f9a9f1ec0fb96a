use aftermath::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(prefix = "nothing_happens")]
enum NothingHappens {}

fn main() {}
