//! The keys each table of the config file may hold, and the TOML type of each.
//!
//! This is what lets `check` report every unknown key and every wrong type in one run: the
//! document is walked against these lists before serde sees it (serde's `deny_unknown_fields`
//! stops at the first). The serde types in `file.rs` are the other half; a unit test below keeps
//! the two lists equal, so a key added to one and not the other fails the build's tests.

/// The TOML type a key must have.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Str,
    Int,
    Bool,
    /// An array of strings, like `listen = ["0.0.0.0:80"]`.
    Strs,
    /// `workers`: a number or the word "auto".
    IntOrStr,
    /// A table, like `[global]`.
    Table(&'static Table),
    /// An array of tables, like `[[frontend]]`.
    Tables(&'static Table),
}

impl Kind {
    /// How the expected type is named in a message.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "an integer",
            Kind::Bool => "true or false",
            Kind::Strs => "an array of strings",
            Kind::IntOrStr => "an integer or a string",
            Kind::Table(_) => "a table",
            Kind::Tables(_) => "an array of tables",
        }
    }
}

/// One table's keys, and how its header is written (for "it belongs in [frontend.health]").
#[derive(Debug)]
pub struct Table {
    pub header: &'static str,
    pub keys: &'static [(&'static str, Kind)],
}

impl Table {
    pub fn get(&self, key: &str) -> Option<Kind> {
        self.keys
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, kind)| *kind)
    }
}

pub static ROOT: Table = Table {
    header: "",
    keys: &[
        ("global", Kind::Table(&GLOBAL)),
        ("admin", Kind::Table(&ADMIN)),
        ("frontend", Kind::Tables(&FRONTEND)),
    ],
};

static GLOBAL: Table = Table {
    header: "[global]",
    keys: &[
        ("workers", Kind::IntOrStr),
        ("max_connections", Kind::Int),
        ("shutdown_timeout", Kind::Str),
        ("grace", Kind::Str),
        ("io", Kind::Str),
        ("relay", Kind::Str),
        ("cpu_affinity", Kind::Str),
        ("ring_buffers", Kind::Int),
        ("resolvers", Kind::Strs),
    ],
};

static ADMIN: Table = Table {
    header: "[admin]",
    keys: &[
        ("listen", Kind::Str),
        ("allow_public", Kind::Bool),
        ("token_file", Kind::Str),
        ("state_file", Kind::Str),
    ],
};

static FRONTEND: Table = Table {
    header: "[[frontend]]",
    keys: &[
        ("name", Kind::Str),
        ("listen", Kind::Strs),
        ("balance", Kind::Str),
        ("connect_timeout", Kind::Str),
        ("connect_hedge", Kind::Str),
        ("idle_timeout", Kind::Str),
        ("retries", Kind::Int),
        ("hash_key", Kind::Str),
        ("maglev_table_size", Kind::Int),
        ("on_marked_down", Kind::Str),
        ("drain_pace", Kind::Str),
        ("client_timeout", Kind::Str),
        ("server_timeout", Kind::Str),
        ("tcp_keepalive", Kind::Str),
        ("source", Kind::Str),
        ("slow_start", Kind::Str),
        ("send_proxy", Kind::Str),
        ("on_ready", Kind::Strs),
        ("on_unready", Kind::Strs),
        ("accept_proxy", Kind::Bool),
        ("proxy_timeout", Kind::Str),
        ("allow", Kind::Strs),
        ("deny", Kind::Strs),
        ("max_connections_per_source", Kind::Int),
        ("rate_per_source", Kind::Str),
        ("queue_timeout", Kind::Str),
        ("max_connections", Kind::Int),
        ("sni_timeout", Kind::Str),
        ("health", Kind::Table(&FRONTEND_HEALTH)),
        ("log", Kind::Table(&FRONTEND_LOG)),
        ("route", Kind::Tables(&ROUTE)),
        ("backend", Kind::Tables(&BACKEND)),
    ],
};

const HEALTH_KEYS: &[(&str, Kind)] = &[
    ("interval", Kind::Str),
    ("timeout", Kind::Str),
    ("rise", Kind::Int),
    ("fall", Kind::Int),
    ("fast_interval", Kind::Str),
    ("down_interval", Kind::Str),
    ("error_limit", Kind::Int),
    ("initial_state", Kind::Str),
    ("spread", Kind::Int),
    ("kind", Kind::Str),
    ("path", Kind::Str),
    ("method", Kind::Str),
    ("host", Kind::Str),
    ("expect_status", Kind::Str),
    ("expect_body", Kind::Str),
    ("send", Kind::Str),
    ("expect", Kind::Str),
    ("expect_regex", Kind::Str),
    ("sni", Kind::Str),
    ("tls", Kind::Bool),
];

static FRONTEND_HEALTH: Table = Table {
    header: "[frontend.health]",
    keys: HEALTH_KEYS,
};

static FRONTEND_LOG: Table = Table {
    header: "[frontend.log]",
    keys: &[
        ("format", Kind::Str),
        ("target", Kind::Str),
        ("syslog_format", Kind::Str),
        ("facility", Kind::Str),
        ("only_errors", Kind::Bool),
        ("skip_null", Kind::Bool),
        ("sample", Kind::Int),
        ("log_connect", Kind::Bool),
    ],
};

static BACKEND: Table = Table {
    header: "[[frontend.backend]]",
    keys: &[
        ("name", Kind::Str),
        ("address", Kind::Str),
        ("discover", Kind::Str),
        ("discover_srv", Kind::Str),
        ("resolve_interval", Kind::Str),
        ("weight", Kind::Int),
        ("backup", Kind::Bool),
        ("check", Kind::Bool),
        ("slow_start", Kind::Str),
        ("send_proxy", Kind::Str),
        ("max_connections", Kind::Int),
        ("pool", Kind::Str),
        ("health", Kind::Table(&BACKEND_HEALTH)),
    ],
};

static ROUTE: Table = Table {
    header: "[[frontend.route]]",
    keys: &[("sni", Kind::Strs), ("pool", Kind::Str)],
};

static BACKEND_HEALTH: Table = Table {
    header: "[frontend.backend.health]",
    keys: HEALTH_KEYS,
};

#[cfg(test)]
mod tests {
    //! The schema and the serde types must list the same keys. serde's derive hands a struct's
    //! field names to `Deserializer::deserialize_struct`; a deserializer that only records them
    //! reads the lists straight from `file.rs`.
    use super::*;
    use crate::config::file::FileAdmin;
    use crate::config::file::{
        FileBackend, FileConfig, FileFrontend, FileGlobal, FileHealth, FileLog, FileRoute,
    };
    use serde::de::{self, Deserialize, Visitor};

    #[derive(Debug)]
    struct Fields(&'static [&'static str]);

    impl std::fmt::Display for Fields {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fields")
        }
    }
    impl std::error::Error for Fields {}
    impl de::Error for Fields {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Fields(&[])
        }
    }

    struct FieldNames;

    impl<'de> de::Deserializer<'de> for FieldNames {
        type Error = Fields;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    fn serde_fields<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        let Err(Fields(fields)) = T::deserialize(FieldNames) else {
            panic!("a struct deserializes from nothing");
        };
        let mut v = fields.to_vec();
        v.sort_unstable();
        v
    }

    fn schema_keys(t: &Table) -> Vec<&'static str> {
        let mut v: Vec<_> = t.keys.iter().map(|(k, _)| *k).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn the_schema_lists_exactly_the_serde_fields() {
        assert_eq!(schema_keys(&ROOT), serde_fields::<FileConfig>());
        assert_eq!(schema_keys(&GLOBAL), serde_fields::<FileGlobal>());
        assert_eq!(schema_keys(&ADMIN), serde_fields::<FileAdmin>());
        assert_eq!(schema_keys(&FRONTEND), serde_fields::<FileFrontend>());
        assert_eq!(schema_keys(&FRONTEND_HEALTH), serde_fields::<FileHealth>());
        assert_eq!(schema_keys(&BACKEND), serde_fields::<FileBackend>());
        assert_eq!(schema_keys(&FRONTEND_LOG), serde_fields::<FileLog>());
        assert_eq!(schema_keys(&ROUTE), serde_fields::<FileRoute>());
    }
}
