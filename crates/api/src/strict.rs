//! Request bodies are JSON objects, and nothing else.
//!
//! serde's derived `Deserialize` for a struct also accepts a sequence of its fields in order, so
//! `{"lines":[["BEE-CND",1]]}` would pass as a sale. [`request!`] declares a request type whose
//! deserializer takes a map only (and refuses unknown keys): one shape per type, documented.

use serde::de::{value::MapAccessDeserializer, Deserialize, Deserializer, MapAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

/// Deserializes `T` from a map only: a sequence (or anything else) is "invalid type".
pub fn map_only<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    struct MapOnly<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for MapOnly<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_map(MapOnly(PhantomData))
}

/// Declares a request struct (serialisable, deserialisable from a JSON object only, unknown keys
/// refused). Field attributes such as `#[serde(default)]` apply as usual.
#[macro_export]
macro_rules! request {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$field_meta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name { $($(#[$field_meta])* pub $field: $ty),* }

        const _: () = {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Fields { $($(#[$field_meta])* $field: $ty),* }

            impl<'de> serde::Deserialize<'de> for $name {
                fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                    let f: Fields = $crate::strict::map_only(deserializer)?;
                    Ok($name { $($field: f.$field),* })
                }
            }
        };
    };
}
