//! Shard assignment for scaling out across replicas (deploy/k8s/README.md).
//!
//! In: the replica's place in the set — the `--shard I/N` flag, or the environment
//! (`REXSTREAM_SHARD_INDEX` + `REXSTREAM_SHARD_COUNT`, or `REXSTREAM_SHARD_COUNT` plus a StatefulSet pod
//! name such as `rexstream-3` in `HOSTNAME`). Out: a [`Shard`] whose [`Shard::owns`] says whether this
//! replica runs a given `[[streams]]` entry. Pure functions; called once on the main thread before any
//! pipeline starts.
//!
//! Every replica reads the same pipeline file and keeps the streams whose stable hash modulo the replica
//! count equals its ordinal, so each stream runs on exactly one replica with no coordination service.
//! The hash is FNV-1a 64 over the stream name's UTF-8 bytes. std's hashers will not do: `RandomState` is
//! seeded randomly per process, and `DefaultHasher`'s algorithm is documented as unspecified and may change
//! between Rust releases — either would let two replicas, or the old and new binary during a rolling
//! update, disagree about who owns a stream.
//!
//! How `run` uses it (run.rs, right after loading the pipeline file):
//! ```ignore
//! let shard = Shard::resolve(args.shard.as_deref(), |k| std::env::var(k).ok())?;
//! pipeline.streams.retain(|s| shard.owns(&s.name));
//! ```
//! With more replicas than streams a shard can own none; `run` then has nothing to watch and exits
//! (deploy/k8s/README.md tells operators to keep replicas ≤ streams).

use std::fmt;
use std::str::FromStr;

/// Environment variable with this replica's ordinal (0-based).
pub const ENV_INDEX: &str = "REXSTREAM_SHARD_INDEX";
/// Environment variable with the number of replicas sharing the pipeline file.
pub const ENV_COUNT: &str = "REXSTREAM_SHARD_COUNT";
/// Set by Kubernetes to the pod name; a StatefulSet names its pods `<set>-<ordinal>`.
pub const ENV_HOSTNAME: &str = "HOSTNAME";

/// FNV-1a 64-bit parameters (http://www.isthe.com/chongo/tech/comp/fnv/, "FNV-1a").
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The stable hash that places a stream on a replica: FNV-1a 64 over the name's UTF-8 bytes.
/// Same value on every platform, process and release — change it and every deployment reshuffles.
pub fn stream_hash(name: &str) -> u64 {
    name.as_bytes().iter().fold(FNV_OFFSET_BASIS, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// Why a shard setting was rejected; each message names the flag or variable and the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("{source_name}: {value:?} is not of the form INDEX/COUNT (e.g. 2/4)")]
    Form { source_name: String, value: String },
    #[error("{source_name}: {value:?} is not a non-negative integer")]
    NotANumber { source_name: String, value: String },
    #[error("{source_name}: replica count must be at least 1, got 0")]
    ZeroCount { source_name: String },
    #[error("{source_name}: index {index} is out of range for {count} replicas (must be 0..={max})", max = count - 1)]
    IndexOutOfRange {
        source_name: String,
        index: u32,
        count: u32,
    },
    #[error("{ENV_INDEX} is set ({index:?}) but {ENV_COUNT} is not; set both, or use --shard INDEX/COUNT")]
    IndexWithoutCount { index: String },
    #[error(
        "{ENV_COUNT} is set but {ENV_INDEX} is not, and {ENV_HOSTNAME} {hostname:?} does not end in a \
         StatefulSet ordinal like \"rexstream-3\""
    )]
    NoOrdinal { hostname: String },
}

/// This replica's slice of the streams: it owns stream `s` iff `stream_hash(s) % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based ordinal of this replica.
    pub index: u32,
    /// Number of replicas; 1 means this process runs every stream.
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Self::ALL
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// A single replica that owns every stream (no sharding configured).
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// A checked shard; `source_name` is the flag or variable reported in errors.
    pub fn new(index: u32, count: u32, source_name: &str) -> Result<Self, ShardError> {
        if count == 0 {
            return Err(ShardError::ZeroCount {
                source_name: source_name.to_owned(),
            });
        }
        if index >= count {
            return Err(ShardError::IndexOutOfRange {
                source_name: source_name.to_owned(),
                index,
                count,
            });
        }
        Ok(Shard { index, count })
    }

    /// Whether this replica runs the stream called `stream` (the `[[streams]] name`).
    pub fn owns(&self, stream: &str) -> bool {
        stream_hash(stream) % u64::from(self.count) == u64::from(self.index)
    }

    /// Parse `INDEX/COUNT` as given to `--shard`; `source_name` names the flag in errors.
    pub fn parse(value: &str, source_name: &str) -> Result<Self, ShardError> {
        let (i, n) = value.split_once('/').ok_or_else(|| ShardError::Form {
            source_name: source_name.to_owned(),
            value: value.to_owned(),
        })?;
        let index = parse_u32(i, source_name)?;
        let count = parse_u32(n, source_name)?;
        Shard::new(index, count, source_name)
    }

    /// The shard from the `--shard` flag if given, else from the environment (read through `env`, so tests
    /// need not touch the process environment):
    /// 1. `REXSTREAM_SHARD_INDEX` and `REXSTREAM_SHARD_COUNT`;
    /// 2. `REXSTREAM_SHARD_COUNT` and the ordinal at the end of `HOSTNAME` (StatefulSet pod `rexstream-3`);
    /// 3. neither set: [`Shard::ALL`].
    ///
    /// `HOSTNAME` is only consulted when a count is configured: an ordinary host name like `gpu-box-2` must
    /// not silently shard a single-node install.
    pub fn resolve(
        flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ShardError> {
        if let Some(v) = flag {
            return Shard::parse(v.trim(), "--shard");
        }
        let index = env(ENV_INDEX).filter(|v| !v.trim().is_empty());
        let count = env(ENV_COUNT).filter(|v| !v.trim().is_empty());
        match (index, count) {
            (None, None) => Ok(Shard::ALL),
            (Some(index), None) => Err(ShardError::IndexWithoutCount { index }),
            (Some(i), Some(n)) => {
                let count = parse_u32(&n, ENV_COUNT)?;
                if count == 0 {
                    return Err(ShardError::ZeroCount {
                        source_name: ENV_COUNT.to_owned(),
                    });
                }
                Shard::new(parse_u32(&i, ENV_INDEX)?, count, ENV_INDEX)
            }
            (None, Some(n)) => {
                let count = parse_u32(&n, ENV_COUNT)?;
                if count == 0 {
                    return Err(ShardError::ZeroCount {
                        source_name: ENV_COUNT.to_owned(),
                    });
                }
                let hostname = env(ENV_HOSTNAME).unwrap_or_default();
                let index =
                    statefulset_ordinal(&hostname).ok_or_else(|| ShardError::NoOrdinal {
                        hostname: hostname.clone(),
                    })?;
                Shard::new(index, count, ENV_HOSTNAME)
            }
        }
    }
}

impl FromStr for Shard {
    type Err = ShardError;
    /// For clap: `#[arg(long, env = "REXSTREAM_SHARD")] shard: Option<Shard>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Shard::parse(s.trim(), "--shard")
    }
}

fn parse_u32(value: &str, source_name: &str) -> Result<u32, ShardError> {
    let v = value.trim();
    // `u32::from_str` accepts a leading '+'; an ordinal written "+2" is a typo we would rather report.
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ShardError::NotANumber {
            source_name: source_name.to_owned(),
            value: value.to_owned(),
        });
    }
    v.parse().map_err(|_| ShardError::NotANumber {
        source_name: source_name.to_owned(),
        value: value.to_owned(),
    })
}

/// The ordinal of a StatefulSet pod name: the digits after the last '-' (`rexstream-12` → 12).
fn statefulset_ordinal(hostname: &str) -> Option<u32> {
    // A pod's HOSTNAME is its name; if a FQDN is ever passed, only the first label is the pod name.
    let name = hostname.trim().split('.').next()?;
    let (_, digits) = name.rsplit_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// Stream names of the kinds operators write: cameras, numbered, unicode, similar prefixes.
    fn names() -> Vec<String> {
        let mut v: Vec<String> = (0..2000).map(|i| format!("cam-{i}")).collect();
        v.extend((0..200).map(|i| format!("site{}/door_{}", i % 7, i)));
        v.extend(
            [
                "",
                "a",
                "front-door",
                "Front-Door",
                "parking lot",
                "café",
                "カメラ1",
            ]
            .map(String::from),
        );
        v
    }

    #[test]
    fn fnv1a_64_matches_published_test_vectors() {
        // Values from the FNV reference test suite; they pin the hash across platforms and releases.
        assert_eq!(stream_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stream_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stream_hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn every_stream_is_owned_by_exactly_one_replica() {
        let names = names();
        for count in 1..=8u32 {
            let shards: Vec<Shard> = (0..count)
                .map(|i| Shard::new(i, count, "test").unwrap())
                .collect();
            let mut per_shard = vec![0usize; count as usize];
            for name in &names {
                let owners: Vec<u32> = shards
                    .iter()
                    .filter(|s| s.owns(name))
                    .map(|s| s.index)
                    .collect();
                assert_eq!(
                    owners.len(),
                    1,
                    "R={count}: stream {name:?} owned by {owners:?}"
                );
                per_shard[owners[0] as usize] += 1;
            }
            // Not a correctness requirement, but a hash that piles streams on one replica would defeat
            // scaling out: with 2207 names each replica should get within ±30% of its fair share.
            let fair = names.len() as f64 / f64::from(count);
            for (i, &n) in per_shard.iter().enumerate() {
                assert!(
                    (n as f64 - fair).abs() < 0.3 * fair,
                    "R={count}: replica {i} got {n} of {}",
                    names.len()
                );
            }
        }
    }

    #[test]
    fn single_replica_owns_everything() {
        assert!(names().iter().all(|n| Shard::ALL.owns(n)));
        assert_eq!(
            Shard::resolve(None, env(&[("HOSTNAME", "rexstream-3")])).unwrap(),
            Shard::ALL
        );
    }

    #[test]
    fn parses_flag() {
        assert_eq!(
            Shard::parse("2/4", "--shard").unwrap(),
            Shard { index: 2, count: 4 }
        );
        assert_eq!(" 0/1 ".parse::<Shard>().unwrap(), Shard::ALL);
        assert_eq!(Shard { index: 3, count: 8 }.to_string(), "3/8");
        // The flag wins over the environment.
        let e = env(&[(ENV_INDEX, "1"), (ENV_COUNT, "2")]);
        assert_eq!(
            Shard::resolve(Some("0/3"), e).unwrap(),
            Shard { index: 0, count: 3 }
        );
    }

    #[test]
    fn parses_env_and_statefulset_hostname() {
        let e = env(&[
            (ENV_INDEX, "1"),
            (ENV_COUNT, "3"),
            (ENV_HOSTNAME, "rexstream-0"),
        ]);
        assert_eq!(
            Shard::resolve(None, e).unwrap(),
            Shard { index: 1, count: 3 }
        );
        let e = env(&[(ENV_COUNT, "4"), (ENV_HOSTNAME, "rexstream-3")]);
        assert_eq!(
            Shard::resolve(None, e).unwrap(),
            Shard { index: 3, count: 4 }
        );
        let e = env(&[
            (ENV_COUNT, "16"),
            (ENV_HOSTNAME, "my-det-set-12.rexstream.ns.svc"),
        ]);
        assert_eq!(
            Shard::resolve(None, e).unwrap(),
            Shard {
                index: 12,
                count: 16
            }
        );
        // Empty variables (as a downward-API field can yield) count as unset.
        let e = env(&[(ENV_INDEX, ""), (ENV_COUNT, " ")]);
        assert_eq!(Shard::resolve(None, e).unwrap(), Shard::ALL);
    }

    #[test]
    fn bad_values_are_rejected_with_the_source_and_value() {
        let err = |flag: Option<&str>, pairs: &[(&str, &str)]| {
            Shard::resolve(flag, env(pairs)).unwrap_err().to_string()
        };

        let m = err(Some("2"), &[]);
        assert!(
            m.contains("--shard") && m.contains("\"2\"") && m.contains("INDEX/COUNT"),
            "{m}"
        );
        let m = err(Some("a/4"), &[]);
        assert!(m.contains("--shard") && m.contains("\"a\""), "{m}");
        let m = err(Some("-1/4"), &[]);
        assert!(m.contains("\"-1\""), "{m}");
        let m = err(Some("+1/4"), &[]);
        assert!(m.contains("\"+1\""), "{m}");
        let m = err(Some("4/4"), &[]);
        assert!(
            m.contains("--shard") && m.contains("index 4") && m.contains("0..=3"),
            "{m}"
        );
        let m = err(Some("0/0"), &[]);
        assert!(m.contains("--shard") && m.contains("at least 1"), "{m}");
        let m = err(Some("1/99999999999"), &[]);
        assert!(m.contains("99999999999"), "{m}");

        let m = err(None, &[(ENV_INDEX, "2")]);
        assert!(
            m.contains(ENV_INDEX) && m.contains(ENV_COUNT) && m.contains("\"2\""),
            "{m}"
        );
        let m = err(None, &[(ENV_INDEX, "x"), (ENV_COUNT, "2")]);
        assert!(m.contains(ENV_INDEX) && m.contains("\"x\""), "{m}");
        let m = err(None, &[(ENV_INDEX, "0"), (ENV_COUNT, "two")]);
        assert!(m.contains(ENV_COUNT) && m.contains("\"two\""), "{m}");
        let m = err(None, &[(ENV_INDEX, "5"), (ENV_COUNT, "5")]);
        assert!(m.contains(ENV_INDEX) && m.contains("index 5"), "{m}");
        let m = err(None, &[(ENV_INDEX, "0"), (ENV_COUNT, "0")]);
        assert!(m.contains(ENV_COUNT) && m.contains("at least 1"), "{m}");
        let m = err(None, &[(ENV_COUNT, "4"), (ENV_HOSTNAME, "gpu-box")]);
        assert!(m.contains(ENV_HOSTNAME) && m.contains("\"gpu-box\""), "{m}");
        let m = err(None, &[(ENV_COUNT, "4")]);
        assert!(m.contains(ENV_HOSTNAME) && m.contains("\"\""), "{m}");
        // Replica count shrank but the pod still exists (e.g. scaled down before the env was updated).
        let m = err(None, &[(ENV_COUNT, "2"), (ENV_HOSTNAME, "rexstream-3")]);
        assert!(
            m.contains(ENV_HOSTNAME) && m.contains("index 3") && m.contains("2 replicas"),
            "{m}"
        );
    }
}
