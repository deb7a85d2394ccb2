//! TensorBoard event files without TensorFlow: `tensorboard.Event` protobufs (encoded with prost)
//! in TFRecord framing (length, masked CRC-32C of the length, data, masked CRC-32C of the data).
//! A writer that appends and flushes one record per call, and a reader that checks both CRCs.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// `tensorboard.Event` (tensorboard/compat/proto/event.proto), the fields peft-sft writes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The training step the event belongs to.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event carries.
    #[prost(oneof = "EventKind", tags = "3, 5, 7")]
    pub what: Option<EventKind>,
}

/// The `what` oneof of [`Event`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum EventKind {
    /// The first record of every file: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// Scalars (and, in other writers, images and histograms).
    #[prost(message, tag = "5")]
    Summary(Summary),
    /// Session status; `START` at step N tells TensorBoard to drop events of steps >= N already
    /// read (from a run that crashed after its last checkpoint).
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorboard.Summary`: the values logged at one step.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// One entry per tag.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorboard.Summary.Value` with a `simple_value` (a scalar).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// The scalar's name, e.g. `train/loss`.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The value. In the proto it is a member of a oneof, so it is written even when 0 (a proto3
    /// plain float would drop 0.0 and TensorBoard would lose the point).
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorboard.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// `SessionStatus`: 1 = START, 2 = STOP, 3 = CHECKPOINT.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `SessionLog.SessionStatus.START`.
pub const SESSION_START: i32 = 1;

/// The file version TensorBoard expects in the first record.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C as TFRecord stores it: rotated right by 15 bits plus a constant, so a CRC over data
/// that holds CRCs does not degenerate.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `data` in TFRecord framing: `u64 len | u32 masked_crc(len) | data | u32 masked_crc(data)`,
/// little-endian.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// Seconds since the Unix epoch, as TensorBoard's `wall_time`.
pub fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The machine's name for the file name (TensorBoard shows it nowhere; it tells files apart).
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let clean: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// Tells apart the files one process creates in the same second.
static FILES_CREATED: AtomicUsize = AtomicUsize::new(0);

/// Appends events to one `events.out.tfevents.*` file.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix secs>.<microseconds>.<host>.<pid>.<n>.peft-sft`
    /// (the folder too) and writes the file-version record. Names sort by creation time, the
    /// order TensorBoard reads a run's files in (a resumed run's file must come after the one it
    /// resumes, even within the same second).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let n = FILES_CREATED.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "events.out.tfevents.{:010}.{:06}.{}.{}.{n}.peft-sft",
            since_epoch.as_secs(),
            since_epoch.subsec_micros(),
            hostname(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let writer = EventWriter { path, file };
        writer.write_event(&Event {
            wall_time: now_seconds(),
            step: 0,
            what: Some(EventKind::FileVersion(FILE_VERSION.into())),
        })?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event with `scalars` (tag, value) at `step`.
    pub fn add_scalars(&self, step: i64, wall_time: f64, scalars: &[(&str, f32)]) -> Result<()> {
        let value = scalars
            .iter()
            .map(|&(tag, value)| SummaryValue {
                tag: tag.into(),
                simple_value: Some(value),
            })
            .collect();
        self.write_event(&Event {
            wall_time,
            step,
            what: Some(EventKind::Summary(Summary { value })),
        })
    }

    /// Appends a `SessionLog START` at `step`: a resumed run writes it at its first new step so
    /// TensorBoard drops the steps an earlier, interrupted run logged after its last checkpoint.
    pub fn add_session_start(&self, step: i64, wall_time: f64) -> Result<()> {
        self.write_event(&Event {
            wall_time,
            step,
            what: Some(EventKind::SessionLog(SessionLog {
                status: SESSION_START,
            })),
        })
    }

    /// Appends one framed record and flushes it to the OS, so a crash loses nothing already
    /// logged.
    fn write_event(&self, event: &Event) -> Result<()> {
        let record = frame_record(&prost::Message::encode_to_vec(event));
        let mut file = &self.file;
        file.write_all(&record)
            .and_then(|()| file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Reads every event of a TFRecord event file, checking both CRCs of each record. A damaged or
/// truncated record is an error naming the file and the record's byte offset.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |offset: usize, what: String| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        message: format!(
            "record at byte offset {offset}: {what}; the event file is damaged (delete it, or \
             keep the records before this offset)"
        ),
    };
    let mut events = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let Some((len_bytes, len_crc)) = rest.get(..8).zip(rest.get(8..12)) else {
            return Err(bad(offset, "truncated header".into()));
        };
        if u32::from_le_bytes(len_crc.try_into().unwrap_or_default()) != masked_crc32c(len_bytes) {
            return Err(bad(offset, "length CRC mismatch".into()));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default());
        let record_len = usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_add(16))
            .filter(|&end| end <= rest.len())
            .ok_or_else(|| bad(offset, format!("truncated: {len} data bytes announced")))?;
        let data_end = record_len - 4;
        let data = &rest[12..data_end];
        let data_crc = &rest[data_end..data_end + 4];
        if u32::from_le_bytes(data_crc.try_into().unwrap_or_default()) != masked_crc32c(data) {
            return Err(bad(offset, "data CRC mismatch".into()));
        }
        let event = <Event as prost::Message>::decode(data)
            .map_err(|e| bad(offset, format!("not a tensorboard.Event: {e}")))?;
        events.push(event);
        offset += record_len;
    }
    Ok(events)
}

/// One scalar point read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    /// The scalar's tag.
    pub tag: String,
    /// Its step.
    pub step: i64,
    /// Its value.
    pub value: f32,
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
}

/// The scalars of `events`, in file order.
pub fn scalars(events: &[Event]) -> Vec<Scalar> {
    events
        .iter()
        .filter_map(|event| match &event.what {
            Some(EventKind::Summary(summary)) => Some((event, summary)),
            _ => None,
        })
        .flat_map(|(event, summary)| {
            summary.value.iter().filter_map(move |v| {
                Some(Scalar {
                    tag: v.tag.clone(),
                    step: event.step,
                    value: v.simple_value?,
                    wall_time: event.wall_time,
                })
            })
        })
        .collect()
}

/// The `*tfevents*` files of a run folder, sorted by name (creation order).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn masked_crc_matches_tensorflow() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    }

    /// Bytes written by TensorFlow's/tensorboard's own writer for the same events.
    #[test]
    fn records_match_tensorboards_bytes() {
        let version = Event {
            wall_time: 1_700_000_000.5,
            step: 0,
            what: Some(EventKind::FileVersion(FILE_VERSION.into())),
        };
        assert_eq!(
            hex(&frame_record(&prost::Message::encode_to_vec(&version))),
            "1800000000000000a37f4b220900002040fc54d9411a0d627261696e2e4576656e743a322b353110"
        );
        let loss = Event {
            wall_time: 1_700_000_000.5,
            step: 7,
            what: Some(EventKind::Summary(Summary {
                value: vec![SummaryValue {
                    tag: "loss".into(),
                    simple_value: Some(1.5),
                }],
            })),
        };
        assert_eq!(
            hex(&frame_record(&prost::Message::encode_to_vec(&loss))),
            "1a00000000000000129bd82d0900002040fc54d94110072a0d0a0b0a046c6f7373150000c03fed7b4304"
        );
    }

    #[test]
    fn scalars_round_trip_and_corruption_names_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let writer = EventWriter::create(&dir.path().join("runs")).unwrap();
        writer
            .add_scalars(
                1,
                10.0,
                &[("train/loss", 2.5), ("train/learning_rate", 0.0)],
            )
            .unwrap();
        writer.add_session_start(2, 11.0).unwrap();
        writer.add_scalars(2, 12.0, &[("eval/loss", 2.25)]).unwrap();
        let files = event_files(&dir.path().join("runs")).unwrap();
        assert_eq!(files, vec![writer.path().to_path_buf()]);
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");

        let events = read_events(&files[0]).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0].what,
            Some(EventKind::FileVersion(FILE_VERSION.into()))
        );
        assert_eq!(
            events[2].what,
            Some(EventKind::SessionLog(SessionLog {
                status: SESSION_START
            }))
        );
        let got: Vec<(String, i64, f32)> = scalars(&events)
            .into_iter()
            .map(|s| (s.tag, s.step, s.value))
            .collect();
        assert_eq!(
            got,
            vec![
                ("train/loss".into(), 1, 2.5),
                ("train/learning_rate".into(), 1, 0.0),
                ("eval/loss".into(), 2, 2.25),
            ]
        );

        // Flip one byte inside the second record's data: its data CRC no longer matches.
        let mut bytes = std::fs::read(&files[0]).unwrap();
        let first_len = 16 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[first_len + 20] ^= 0x40;
        let damaged = dir.path().join("damaged.tfevents");
        std::fs::write(&damaged, &bytes).unwrap();
        let err = read_events(&damaged).unwrap_err().to_string();
        assert!(err.contains("damaged.tfevents"), "{err}");
        assert!(
            err.contains(&format!("byte offset {first_len}: data CRC mismatch")),
            "{err}"
        );

        // A torn last record (a crash mid-write) is reported, not misread.
        std::fs::write(
            &damaged,
            &std::fs::read(&files[0]).unwrap()[..first_len + 10],
        )
        .unwrap();
        let err = read_events(&damaged).unwrap_err().to_string();
        assert!(
            err.contains(&format!("byte offset {first_len}: truncated")),
            "{err}"
        );
    }

    #[test]
    fn zero_is_written_as_a_value() {
        let value = SummaryValue {
            tag: "lr".into(),
            simple_value: Some(0.0),
        };
        assert_eq!(
            hex(&prost::Message::encode_to_vec(&value)),
            "0a026c721500000000"
        );
    }
}
