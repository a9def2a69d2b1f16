//! `--verify` re-reads what was written: a flipped byte on disk is caught and named.

use vicugna_weights::safetensors_io::{verify_checkpoint, Checkpoint, OutTensor, ShardedWriter};
use vicugna_weights::NoProgress;

#[test]
fn verify_catches_a_changed_byte_and_names_the_tensor() {
    let dir = std::env::temp_dir().join(format!("vicugna-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let names = ["a.weight", "b.weight", "c.weight"];
    let outs = names
        .iter()
        .map(|n| OutTensor {
            name: n.to_string(),
            dtype: "F32".into(),
            shape: vec![100, 10],
        })
        .collect();
    // 4 KB per tensor, shards of 5 KB: one tensor per shard, plus an index.
    let mut w = ShardedWriter::new(&dir, outs, 5000, true);
    for (k, n) in names.iter().enumerate() {
        w.begin(n).unwrap();
        let bytes: Vec<u8> = (0..4000).map(|i| (i * 7 + k) as u8).collect();
        w.write(&bytes[..1000]).unwrap();
        w.write(&bytes[1000..]).unwrap();
        w.end().unwrap();
    }
    let sums = w.finish().unwrap();
    assert!(dir.join("model.safetensors.index.json").is_file());
    verify_checkpoint(&dir, &sums, &NoProgress).unwrap();

    let ck = Checkpoint::open_dir(&dir).unwrap();
    let t = ck.get("b.weight").unwrap().clone();
    let path = ck.path_of(&t).to_path_buf();
    drop(ck);
    let mut data = std::fs::read(&path).unwrap();
    data[t.offset as usize + 123] ^= 1;
    std::fs::write(&path, data).unwrap();
    let err = verify_checkpoint(&dir, &sums, &NoProgress).unwrap_err().to_string();
    assert!(err.contains("b.weight") && err.contains("checksum"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
