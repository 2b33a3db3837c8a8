//! Reference parity: stack.
