//! PLACEHOLDER: replaced by the wgpu backend implementation.
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub enum AdapterPick {
    HardwareOnly,
    Any,
    Name(String),
}
impl AdapterPick {
    pub fn from_env() -> Option<Self> {
        std::env::var("DYNSPARSE_WGPU_ADAPTER").ok().map(AdapterPick::Name)
    }
}
impl std::fmt::Display for AdapterPick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
pub struct WgpuBackend;
impl WgpuBackend {
    pub fn new(_p: &AdapterPick) -> Result<Self> {
        Err(Error::Unavailable("wgpu backend not built yet".into()))
    }
}
