//! Home Assistant MQTT discovery (`[homeassistant] discovery = true`): retained config messages
//! that make Home Assistant create, per stream, one device and, per (stream, label), an occupancy
//! `binary_sensor`, a count `sensor` and an `image` of the latest snapshot; availability follows
//! `<prefix>/available`.
//!
//! In: each stream's prompt categories (the labels), read on every events-thread tick, so a
//! prompt changed over MQTT adds and removes entities within a second. Out: `(topic, payload)`
//! pairs for the outbox: a JSON config (retained) per new entity, an empty retained payload per
//! entity whose label left the prompt (Home Assistant deletes it). Pure state, no I/O.
//!
//! Keys are those of Home Assistant's MQTT integration docs (binary_sensor.mqtt, sensor.mqtt,
//! image.mqtt, and the discovery page's device and availability keys); the test below checks every
//! payload against those lists.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::object::topic_label;

/// Discovery topic `<discovery prefix>/<component>/<node>/<object>/config`; object ids are made of
/// `[a-zA-Z0-9_-]` only (Home Assistant's rule for them).
fn object_id(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What has been announced, per stream.
#[derive(Debug, Default)]
pub struct Discovery {
    discovery_prefix: String,
    prefix: String,
    announced: BTreeMap<String, BTreeSet<String>>,
}

impl Discovery {
    /// `discovery_prefix`: `[homeassistant] prefix`; `prefix`: `[mqtt] prefix`.
    pub fn new(discovery_prefix: &str, prefix: &str) -> Self {
        Self {
            discovery_prefix: discovery_prefix.to_string(),
            prefix: prefix.to_string(),
            announced: BTreeMap::new(),
        }
    }

    fn topic(&self, component: &str, stream: &str, label: &str, what: &str) -> String {
        format!(
            "{}/{component}/{}/{}_{}_{what}/config",
            self.discovery_prefix,
            object_id(&self.prefix),
            object_id(stream),
            object_id(label)
        )
    }

    /// The three entities of (stream, label): `(topic, config)`.
    pub fn configs(&self, stream: &str, label: &str) -> Vec<(String, Value)> {
        let p = &self.prefix;
        let uid = |what: &str| {
            format!(
                "{}_{}_{}_{what}",
                object_id(p),
                object_id(stream),
                object_id(label)
            )
        };
        let device = json!({
            "identifiers": [format!("{}_{}", object_id(p), object_id(stream))],
            "name": stream,
            "manufacturer": "rexstream",
            "model": "Rex-Omni open-vocabulary detector",
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        let availability = json!([{
            "topic": format!("{p}/available"),
            "payload_available": "online",
            "payload_not_available": "offline",
        }]);
        let count_topic = format!("{p}/{stream}/{label}");
        vec![
            (
                self.topic("binary_sensor", stream, label, "occupancy"),
                json!({
                    "name": format!("{label} occupancy"),
                    "unique_id": uid("occupancy"),
                    "device": device.clone(),
                    "availability": availability.clone(),
                    "state_topic": count_topic.clone(),
                    "value_template": "{{ 'ON' if (value | int(0)) > 0 else 'OFF' }}",
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "device_class": "occupancy",
                }),
            ),
            (
                self.topic("sensor", stream, label, "count"),
                json!({
                    "name": format!("{label} count"),
                    "unique_id": uid("count"),
                    "device": device.clone(),
                    "availability": availability.clone(),
                    "state_topic": count_topic,
                    "state_class": "measurement",
                    "unit_of_measurement": "objects",
                    "icon": "mdi:counter",
                }),
            ),
            (
                self.topic("image", stream, label, "snapshot"),
                json!({
                    "name": format!("{label} snapshot"),
                    "unique_id": uid("snapshot"),
                    "device": device,
                    "availability": availability,
                    "image_topic": format!("{p}/{stream}/{label}/snapshot"),
                    "content_type": "image/jpeg",
                }),
            ),
        ]
    }

    /// Bring stream's announced entities in line with `categories`; the messages to publish
    /// (retained): configs for new labels, empty payloads for labels that left the prompt.
    pub fn sync(&mut self, stream: &str, categories: &[String]) -> Vec<(String, Vec<u8>)> {
        let want: BTreeSet<String> = categories.iter().map(|c| topic_label(c)).collect();
        let have = self.announced.get(stream).cloned().unwrap_or_default();
        let mut out = Vec::new();
        for label in want.difference(&have) {
            for (topic, cfg) in self.configs(stream, label) {
                out.push((topic, cfg.to_string().into_bytes()));
            }
        }
        for label in have.difference(&want) {
            for (topic, _) in self.configs(stream, label) {
                out.push((topic, Vec::new()));
            }
        }
        self.announced.insert(stream.to_string(), want);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys every MQTT entity accepts (Home Assistant MQTT docs: availability, device, naming).
    const COMMON: &[&str] = &[
        "availability",
        "availability_mode",
        "availability_template",
        "availability_topic",
        "device",
        "enabled_by_default",
        "encoding",
        "entity_category",
        "entity_picture",
        "icon",
        "json_attributes_template",
        "json_attributes_topic",
        "name",
        "object_id",
        "default_entity_id",
        "payload_available",
        "payload_not_available",
        "platform",
        "qos",
        "unique_id",
    ];
    /// binary_sensor.mqtt configuration variables.
    const BINARY_SENSOR: &[&str] = &[
        "device_class",
        "expire_after",
        "force_update",
        "off_delay",
        "payload_off",
        "payload_on",
        "state_topic",
        "value_template",
    ];
    /// sensor.mqtt configuration variables.
    const SENSOR: &[&str] = &[
        "device_class",
        "expire_after",
        "force_update",
        "last_reset_value_template",
        "options",
        "suggested_display_precision",
        "state_class",
        "state_topic",
        "unit_of_measurement",
        "value_template",
    ];
    /// image.mqtt configuration variables.
    const IMAGE: &[&str] = &[
        "content_type",
        "image_encoding",
        "image_topic",
        "url_template",
        "url_topic",
    ];
    /// `device` keys.
    const DEVICE: &[&str] = &[
        "configuration_url",
        "connections",
        "hw_version",
        "identifiers",
        "manufacturer",
        "model",
        "model_id",
        "name",
        "serial_number",
        "suggested_area",
        "sw_version",
        "via_device",
    ];
    const AVAILABILITY: &[&str] = &[
        "payload_available",
        "payload_not_available",
        "topic",
        "value_template",
    ];

    fn check(component: &str, cfg: &Value) -> Vec<String> {
        let (own, required): (&[&str], &[&str]) = match component {
            "binary_sensor" => (BINARY_SENSOR, &["state_topic"]),
            "sensor" => (SENSOR, &["state_topic"]),
            "image" => (IMAGE, &[]),
            other => panic!("{other}"),
        };
        let mut errs = Vec::new();
        let obj = cfg.as_object().expect("object");
        for k in obj.keys() {
            if !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str()) {
                errs.push(format!("{component}: unknown key {k}"));
            }
        }
        for r in required {
            if !obj.contains_key(*r) {
                errs.push(format!("{component}: missing {r}"));
            }
        }
        // image needs exactly one of image_topic / url_topic.
        if component == "image" && obj.contains_key("image_topic") == obj.contains_key("url_topic")
        {
            errs.push("image: needs exactly one of image_topic, url_topic".into());
        }
        for k in obj["device"].as_object().expect("device").keys() {
            if !DEVICE.contains(&k.as_str()) {
                errs.push(format!("device: unknown key {k}"));
            }
        }
        for a in obj["availability"].as_array().expect("availability") {
            for k in a.as_object().expect("entry").keys() {
                if !AVAILABILITY.contains(&k.as_str()) {
                    errs.push(format!("availability: unknown key {k}"));
                }
            }
        }
        if let Some(dc) = obj.get("device_class") {
            if component == "binary_sensor" && dc != "occupancy" {
                errs.push(format!("binary_sensor: device_class {dc}"));
            }
        }
        if let Some(sc) = obj.get("state_class") {
            if ![
                "measurement",
                "total",
                "total_increasing",
                "measurement_angle",
            ]
            .contains(&sc.as_str().unwrap_or(""))
            {
                errs.push(format!("sensor: state_class {sc}"));
            }
        }
        errs
    }

    #[test]
    fn payloads_use_only_documented_keys() {
        let d = Discovery::new("homeassistant", "frigate");
        let cfgs = d.configs("front.door", "red car");
        assert_eq!(cfgs.len(), 3);
        for (topic, cfg) in &cfgs {
            let component = topic.split('/').nth(1).unwrap();
            assert!(
                topic.starts_with("homeassistant/") && topic.ends_with("/config"),
                "{topic}"
            );
            // node and object ids: [a-zA-Z0-9_-] only.
            for level in topic.split('/').skip(2).take(2) {
                assert!(
                    level
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                    "{topic}"
                );
            }
            let errs = check(component, cfg);
            assert!(errs.is_empty(), "{errs:?}\n{cfg:#}");
        }
        assert_eq!(cfgs[0].1["state_topic"], "frigate/front.door/red car");
        assert_eq!(
            cfgs[2].1["image_topic"],
            "frigate/front.door/red car/snapshot"
        );
        assert_eq!(cfgs[0].1["availability"][0]["topic"], "frigate/available");
        // The checker itself rejects what it should.
        let mut bad = cfgs[1].1.clone();
        bad["stat_topic"] = json!("x");
        assert_eq!(check("sensor", &bad), ["sensor: unknown key stat_topic"]);
    }

    #[test]
    fn labels_leaving_the_prompt_are_removed_with_empty_retained_payloads() {
        let mut d = Discovery::new("homeassistant", "rexstream");
        let first = d.sync("cam", &["person".into(), "car".into()]);
        assert_eq!(first.len(), 6);
        assert!(first.iter().all(|(_, p)| !p.is_empty()));
        assert!(
            d.sync("cam", &["car".into(), "person".into()]).is_empty(),
            "no change, no message"
        );
        let second = d.sync("cam", &["person".into(), "dog".into()]);
        let removed: Vec<&String> = second
            .iter()
            .filter(|(_, p)| p.is_empty())
            .map(|(t, _)| t)
            .collect();
        let added: Vec<&String> = second
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(t, _)| t)
            .collect();
        assert_eq!(removed.len(), 3);
        assert!(removed.iter().all(|t| t.contains("_car_")), "{removed:?}");
        assert_eq!(added.len(), 3);
        assert!(added.iter().all(|t| t.contains("_dog_")), "{added:?}");
    }
}
