//! Reference parity: slstm.
