// TEMPORARY placeholder while the real module is written; never committed.
use bytes::{Bytes, BytesMut};
pub struct LocalStore;
impl LocalStore {
    pub fn new(_d: usize) -> Self {
        LocalStore
    }
    pub fn execute(&self, _db: usize, _args: &[Bytes], _resp3: bool, out: &mut BytesMut) {
        crate::resp::error(out, "ERR placeholder")
    }
    pub fn supports(_n: &[u8]) -> bool {
        false
    }
    pub fn sweep_expired(&self) -> usize {
        0
    }
}
