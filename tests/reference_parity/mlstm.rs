//! Reference parity: mlstm.
