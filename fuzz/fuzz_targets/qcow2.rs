//! Fuzzes the qcow2 reader: any input must parse or be refused without a panic, and a parsed
//! image must map and inflate without one. See the `volumed::qcow2` module doc to run it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use volumed::qcow2::{Decompressor, Extent, Qcow2Image};

/// Inflating is the slow part; a few clusters per input exercise it enough.
const MAX_INFLATED: usize = 64;

fuzz_target!(|bytes: &[u8]| {
    let Ok(image) = Qcow2Image::parse(bytes) else {
        return;
    };

    let mut cluster = vec![0u8; image.cluster_size() as usize];
    let mut decompressor = Decompressor::new();
    let mut inflated = 0;
    for mapping in image.mappings() {
        let mapping = mapping.expect("a parsed image maps without errors");
        match mapping.extent {
            Extent::Data { .. } => assert!(image.host_bytes(&mapping).is_some()),
            Extent::Compressed { .. } if inflated < MAX_INFLATED => {
                inflated += 1;
                let _ = image.decompress_cluster_with(&mut decompressor, &mapping, &mut cluster);
            }
            _ => {}
        }
    }
});
