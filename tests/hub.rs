//! `hf:` model names resolve through the Hugging Face cache (offline here: no hub is reachable in
//! tests) and load the real model the cache holds.
mod common;

use candle_core::Device;
use hearth::model::Model;

#[test]
fn a_gguf_in_the_hub_cache_loads_by_name_offline() {
    let root = std::env::temp_dir().join(format!("hearth-hf-home-{}", std::process::id()));
    let snap = root.join("hub/models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF/snapshots/c0ffee");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(snap.parent().unwrap().parent().unwrap().join("refs")).unwrap();
    std::fs::write(
        snap.parent().unwrap().parent().unwrap().join("refs/main"),
        "c0ffee",
    )
    .unwrap();
    std::os::unix::fs::symlink(common::smollm2(), snap.join("smollm2.gguf")).unwrap();
    // This test binary is its own process, so setting the environment here touches no other test.
    std::env::set_var("HF_HOME", &root);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let name = "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2.gguf";
    let m = Model::load(std::path::Path::new(name), "hub", &Device::Cpu).expect("loads from cache");
    let local = common::load(&common::smollm2());
    assert_eq!(m.decoder.cfg.n_layers, local.decoder.cfg.n_layers);
    let ids = local.tokenizer.encode("The capital of France is").unwrap();
    assert_eq!(m.tokenizer.encode("The capital of France is").unwrap(), ids);
    let e = Model::load(
        std::path::Path::new("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:other.gguf"),
        "hub",
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("other.gguf") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    std::fs::remove_dir_all(&root).ok();
}
