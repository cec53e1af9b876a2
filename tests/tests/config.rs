//! One environment configures every process: each reads its own sections and leaves the
//! others' alone, so no process may refuse a key another process has in a section they share
//! (`database`, `nats`, `runtime`, `maintenance`, `log`).

use std::collections::BTreeMap;

/// Every key of a process's defaults, as the `SAGA_` variable that sets it.
fn env_of(defaults: &str) -> BTreeMap<String, String> {
    let map = config::Config::builder()
        .add_source(config::File::from_str(defaults, config::FileFormat::Toml))
        .build()
        .unwrap()
        .try_deserialize::<config::Map<String, config::Value>>()
        .unwrap();
    let mut env = BTreeMap::new();
    for (section, value) in map {
        let Ok(table) = value.into_table() else {
            continue;
        };
        for (key, value) in table {
            if let Ok(v) = value.into_string() {
                env.insert(
                    format!("SAGA_{}__{}", section.to_uppercase(), key.to_uppercase()),
                    v,
                );
            }
        }
    }
    assert!(env.len() > 5, "{env:?}");
    env
}

#[test]
fn the_workers_take_the_orchestrators_environment() {
    let env = env_of(orchestrator::config::DEFAULTS);
    workers::config::Settings::load_from(env).unwrap();
}

#[test]
fn the_orchestrator_takes_the_workers_environment() {
    let env = env_of(workers::config::DEFAULTS);
    orchestrator::config::Settings::load_from(env).unwrap();
}
