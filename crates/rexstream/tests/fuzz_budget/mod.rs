//! The input budget shared by the proptest fuzzers (`fuzz_*.rs`): `PROPTEST_CASES` cases per property
//! (default [`DEFAULT_CASES`], a few seconds in CI on 2 shared cores), and a counter that prints how many
//! inputs each property really checked, so a long run's figure comes from the run itself.

use proptest::test_runner::Config;

/// Cases per property when `PROPTEST_CASES` is unset.
pub const DEFAULT_CASES: u32 = 3000;

pub fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

pub fn config() -> Config {
    Config {
        cases: cases(),
        ..Config::default()
    }
}

/// Count one generated input of property `name`; print the total when its budget is spent.
pub fn count(name: &str) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static COUNTS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let mut g = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let n = g
        .get_or_insert_with(HashMap::new)
        .entry(name.to_string())
        .or_insert(0);
    *n += 1;
    if *n == u64::from(cases()) {
        println!("{name}: {n} inputs without a panic");
    }
}
