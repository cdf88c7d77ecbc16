//! Walks the parsed TOML document against the schema, before serde sees it.
//!
//! Every unknown key and every value of the wrong type is reported here, each at its span, and
//! left out of the table handed on to serde, so serde never stops at the first one and
//! validation still runs on everything that is well-formed. The walk also records the span of
//! every key it kept, for validation errors to point at.

use std::collections::HashSet;

use toml_edit::{Item, TableLike, Value};

use super::problem::{At, Problem, Spans};
use super::schema::{self, Kind, Table};
use super::suggest::closest;

pub struct Walked {
    /// The document with only known keys of the right type.
    pub table: toml::Table,
    pub problems: Vec<Problem>,
    pub spans: Spans,
    /// TOML paths already reported; validation problems at or inside them are follow-ons
    /// (a dropped `name = 5` would otherwise also be "missing").
    pub reported: HashSet<String>,
}

pub fn walk(doc: &toml_edit::ImDocument<&str>) -> Walked {
    let mut w = Walked {
        table: toml::Table::new(),
        problems: Vec::new(),
        spans: Spans::default(),
        reported: HashSet::new(),
    };
    w.table = w.table_like(doc.as_table(), &schema::ROOT, "", "");
    w
}

/// "frontend \"web\"" inside "" is "frontend \"web\""; "weight" inside "backend" is "backend: weight".
fn join(outer: &str, inner: &str, sep: &str) -> String {
    if outer.is_empty() {
        inner.to_string()
    } else {
        format!("{outer}{sep}{inner}")
    }
}

fn a_or_an(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

impl Walked {
    fn report(&mut self, at: Option<std::ops::Range<usize>>, label: &str, msg: String) {
        self.problems.push(Problem {
            at: at.map_or(At::Nowhere, At::Span),
            text: join(label, &msg, ": "),
        });
    }

    /// `label` names the table for a human (`frontend "web": health`); `path` for the span map
    /// (`frontend.0.health`).
    fn table_like(
        &mut self,
        t: &dyn TableLike,
        schema: &Table,
        label: &str,
        path: &str,
    ) -> toml::Table {
        let mut out = toml::Table::new();
        for (key, item) in t.iter() {
            let key_span = t.get_key_value(key).and_then(|(k, _)| k.span());
            let key_path = join(path, key, ".");
            let Some(kind) = schema.get(key) else {
                self.unknown(t, schema, key, key_span, label, path);
                continue;
            };
            let span = item.span().or_else(|| key_span.clone());
            if let Some(s) = span.clone() {
                self.spans.0.insert(key_path.clone(), s);
            }
            let key_label = join(label, key, ": ");
            match self.value(item, kind, &key_label, label, key, &key_path) {
                Some(v) => {
                    out.insert(key.to_string(), v);
                }
                None => {
                    self.reported.insert(key_path);
                }
            }
        }
        out
    }

    fn unknown(
        &mut self,
        t: &dyn TableLike,
        schema: &Table,
        key: &str,
        span: Option<std::ops::Range<usize>>,
        label: &str,
        path: &str,
    ) {
        let known = || schema.keys.iter().map(|(k, _)| *k);
        let mut msg = format!("unknown key `{key}`");
        if let Some(k) = closest(key, known()) {
            msg += &format!(": did you mean `{k}`?");
            // `nmae = "web"` is one mistake: do not also say that `name` is missing.
            if !t.contains_key(k) {
                self.reported.insert(join(path, k, "."));
            }
        } else if let Some(sub) = schema.keys.iter().find_map(|(_, kind)| match kind {
            Kind::Table(s) | Kind::Tables(s) if s.get(key).is_some() => Some(s),
            _ => None,
        }) {
            msg += &format!(": it belongs in {}", sub.header);
        } else {
            let list: Vec<_> = known().collect();
            msg += &format!(" (known here: {})", list.join(", "));
        }
        self.report(span, label, msg);
    }

    /// The value converted for serde, or None (reported) if it has the wrong type.
    fn value(
        &mut self,
        item: &Item,
        kind: Kind,
        key_label: &str,
        table_label: &str,
        key: &str,
        key_path: &str,
    ) -> Option<toml::Value> {
        let v = item.as_value();
        let found = match (kind, item, v) {
            (Kind::Str | Kind::IntOrStr, _, Some(Value::String(s))) => {
                return Some(toml::Value::String(s.value().clone()))
            }
            (Kind::Int | Kind::IntOrStr, _, Some(Value::Integer(i))) => {
                return Some(toml::Value::Integer(*i.value()))
            }
            (Kind::Bool, _, Some(Value::Boolean(b))) => {
                return Some(toml::Value::Boolean(*b.value()))
            }
            (Kind::Strs, _, Some(Value::Array(a))) => return self.strings(a, key_label, key_path),
            (Kind::Table(s), Item::Table(t), _) => {
                return Some(toml::Value::Table(
                    self.table_like(t, s, key_label, key_path),
                ))
            }
            (Kind::Table(s), _, Some(Value::InlineTable(t))) => {
                return Some(toml::Value::Table(
                    self.table_like(t, s, key_label, key_path),
                ))
            }
            (Kind::Tables(s), Item::ArrayOfTables(a), _) => {
                let elems: Vec<&dyn TableLike> = a.iter().map(|t| t as &dyn TableLike).collect();
                let spans: Vec<_> = a.iter().map(|t| t.span()).collect();
                return Some(self.tables(&elems, &spans, s, table_label, key, key_path));
            }
            (Kind::Tables(s), _, Some(Value::Array(a)))
                if a.iter().all(|e| e.as_inline_table().is_some()) =>
            {
                let elems: Vec<&dyn TableLike> = a
                    .iter()
                    .filter_map(|e| e.as_inline_table().map(|t| t as &dyn TableLike))
                    .collect();
                let spans: Vec<_> = a.iter().map(|e| e.span()).collect();
                return Some(self.tables(&elems, &spans, s, table_label, key, key_path));
            }
            _ => item.type_name(),
        };
        let hint = match kind {
            Kind::Table(s) | Kind::Tables(s) => format!(" (write it as {})", s.header),
            _ => String::new(),
        };
        self.report(
            item.span(),
            key_label,
            format!(
                "expected {}, found {} {found}{hint}",
                kind.describe(),
                a_or_an(found)
            ),
        );
        None
    }

    fn strings(&mut self, a: &toml_edit::Array, label: &str, path: &str) -> Option<toml::Value> {
        let mut out = Vec::new();
        let mut ok = true;
        for (i, e) in a.iter().enumerate() {
            let elem_path = format!("{path}.{i}");
            if let Some(s) = e.span() {
                self.spans.0.insert(elem_path, s);
            }
            match e.as_str() {
                Some(s) => out.push(toml::Value::String(s.to_string())),
                None => {
                    let found = e.type_name();
                    self.report(
                        e.span(),
                        label,
                        format!("expected strings, found {} {found}", a_or_an(found)),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(toml::Value::Array(out))
    }

    /// `[[frontend]]` and `[[frontend.backend]]`: each element is labelled by its name, the way
    /// validation labels it, so both kinds of problem read alike.
    fn tables(
        &mut self,
        elems: &[&dyn TableLike],
        spans: &[Option<std::ops::Range<usize>>],
        schema: &Table,
        table_label: &str,
        key: &str,
        key_path: &str,
    ) -> toml::Value {
        let mut out = Vec::new();
        for (i, (t, span)) in elems.iter().zip(spans).enumerate() {
            let elem_path = format!("{key_path}.{i}");
            if let Some(s) = span {
                self.spans.0.insert(elem_path.clone(), s.clone());
            }
            let elem = match t.get("name").and_then(|n| n.as_str()) {
                Some(n) => format!("{key} \"{n}\""),
                None => format!("{key} #{}", i + 1),
            };
            let label = join(table_label, &elem, ": ");
            out.push(toml::Value::Table(
                self.table_like(*t, schema, &label, &elem_path),
            ));
        }
        toml::Value::Array(out)
    }
}
