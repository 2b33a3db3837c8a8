//! Parity with the official implementation's vectors in `../shared/reference/`
//! (override the folder with `XLSTM_REFERENCE_DIR`).

mod reference_parity {
    pub mod common;
    pub mod mlstm;
    pub mod slstm;
    pub mod stack;
}
