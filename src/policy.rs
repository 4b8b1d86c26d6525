//! (placeholder, being written)
use std::collections::BTreeMap;
pub struct Policy;
impl Policy {
    pub fn new(_admin_group: &str, _rules: &BTreeMap<String, String>) -> Result<Self, String> {
        Ok(Policy)
    }
}
