//! Runnable applications built on aftermath. Each binary in `src/bin` is one
//! use case; the domain code they share lives in modules here.

pub mod bank;
pub mod effects_service;
pub mod fulfillment;
pub mod shop;
pub mod two_services;
