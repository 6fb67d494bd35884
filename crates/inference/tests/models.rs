//! The real pinned models, loaded from the repository's `models/` folder.

use stallmesh_inference::{dot, Models};
use std::path::PathBuf;
use std::sync::OnceLock;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| Models::load(&models_dir()))
}

#[test]
fn both_pinned_models_load_and_report_their_hashes() {
    let m = models();
    let manifest = stallmesh_inference::Manifest::builtin();
    for (s, pinned) in m.status.iter().zip([&manifest.text.model.sha256, &manifest.image.model.sha256]) {
        assert!(s.loaded, "{} failed to load: {:?}", s.name, s.error);
        assert_eq!(s.sha256.as_ref(), Some(pinned), "the status shows the file's pinned hash");
    }
}

#[test]
fn text_embeddings_put_related_products_closer_than_unrelated_ones() {
    let text = models().text.as_ref().expect("text model");
    let e = |s: &str| text.embed(s).unwrap();
    let honey = e("honey jar");
    let (raw, pump) = (e("raw honey"), e("bicycle pump"));
    assert_eq!(honey.len(), 384);
    assert!((dot(&honey, &honey) - 1.0).abs() < 1e-4, "unit length");
    assert!(dot(&honey, &raw) > 0.5, "honey jar ~ raw honey: {}", dot(&honey, &raw));
    assert!(dot(&honey, &pump) < 0.3, "honey jar !~ bicycle pump: {}", dot(&honey, &pump));
}

#[test]
fn an_augmented_photo_is_closest_to_its_original() {
    let image = models().image.as_ref().expect("image model");
    let photo = |f: &str| image.embed(&std::fs::read(models_dir().join("images").join(f)).unwrap()).unwrap();
    let (coffee, coffee_aug, chelsea, chelsea_aug) =
        (photo("coffee.png"), photo("coffee_aug.jpg"), photo("chelsea.png"), photo("chelsea_aug.jpg"));
    assert_eq!(coffee.len(), 1280);
    assert!(
        dot(&coffee, &coffee_aug) > dot(&coffee, &chelsea_aug) + 0.3,
        "{} vs {}",
        dot(&coffee, &coffee_aug),
        dot(&coffee, &chelsea_aug)
    );
    assert!(dot(&chelsea, &chelsea_aug) > dot(&chelsea, &coffee_aug) + 0.3);
}

#[test]
fn a_tampered_or_missing_model_is_refused_and_the_other_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "efficientnet-lite0-feat.onnx"] {
        std::fs::copy(models_dir().join(f), dir.path().join(f)).unwrap();
    }
    // The text model is present but one byte differs from the pinned file.
    let mut bytes = std::fs::read(models_dir().join("all-MiniLM-L6-v2-dynint8.onnx")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(dir.path().join("all-MiniLM-L6-v2-dynint8.onnx"), bytes).unwrap();
    let m = Models::load(dir.path());
    assert!(m.text.is_none());
    let text = &m.status[0];
    assert!(!text.loaded);
    assert!(text.error.as_deref().unwrap().contains("does not match the manifest"), "{:?}", text.error);
    assert!(m.image.is_some(), "the untouched image model still loads");

    let empty = tempfile::tempdir().unwrap();
    let m = Models::load(empty.path());
    assert!(m.text.is_none() && m.image.is_none());
    assert!(m.status.iter().all(|s| s.error.as_deref().unwrap().contains("cannot read")));
}
