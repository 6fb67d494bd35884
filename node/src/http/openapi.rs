//! The OpenAPI 3.1 document of the node's HTTP API, served at `GET /api/v1/openapi.json`.
//!
//! Generated (utoipa) from each handler's `#[utoipa::path]` and the `stallmesh-api` types, not
//! written by hand. Architecture invariant: every operation documents every status it can answer:
//! its own, and the ones the shared layers give any request ([`SHARED_ERRORS`]), each with its
//! `error` codes.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{OpenApi as Document, Ref, RefOr, Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::{catalogue, drops, events, loyalty, mesh, sales, search, session, status, stock, till};

/// Declares a body of raw bytes (a string of format `binary` in the document).
macro_rules! binary_body {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub(super) struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary))).into()
            }
        }
        impl ToSchema for $name {}
    };
}

binary_body!(
    /// A photo upload or download: JPEG or PNG bytes.
    ImageBody
);
binary_body!(
    /// `POST/GET /api/v1/changes`: a postcard-encoded `Vec<SignedChange>`.
    ChangesBody
);

/// A revocation signed with the market key: hex ids and signature, as `stallmesh market revoke`
/// writes it.
pub(super) struct RevocationBody;

impl PartialSchema for RevocationBody {
    fn schema() -> RefOr<Schema> {
        let hex = |what: &str| ObjectBuilder::new().schema_type(Type::String).description(Some(what.to_string()));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("market", hex("The market id, 64 hex characters"))
            .property("device", hex("The revoked device, 64 hex characters"))
            .property("revoked_at_ms", ObjectBuilder::new().schema_type(Type::Integer).format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64))).minimum(Some(0)))
            .property("signature", hex("The market key's ed25519 signature, 128 hex characters"))
            .required("market")
            .required("device")
            .required("revoked_at_ms")
            .required("signature")
            .into()
    }
}
impl ToSchema for RevocationBody {}

/// Statuses any request may get from the layers every route shares (the JSON and path
/// extractors, the body limits, the staff guard, the Host check, the store), with their codes.
pub const SHARED_ERRORS: &[(&str, &str)] = &[
    ("400", "`bad_request`, `malformed_json`: a query string, path or body the endpoint cannot parse; `empty_image`; `invalid`"),
    ("401", "`sign_in_required`: this till asks for a staff sign-in (`POST /api/v1/session`); `wrong_pin`"),
    ("403", "`cross_site_request`: a write from another site; `unknown_host`: a Host header that is not this node; `device_not_allowed`: this device is revoked; `role_forbids`, `other_stall`: this device may not record that"),
    ("413", "`body_too_large`: the body is over the endpoint's limit (`image_too_large`, `too_many_changes`)"),
    ("415", "`unsupported_media_type`: a JSON body without `Content-Type: application/json`; `unsupported_image_format`"),
    ("422", "`invalid_input`, `invalid_body`: well-formed, but a value is out of range or refers to nothing (`unknown_sku`, `unknown_device`, `mixed_currency`, `corrupt_image`, `no_qr_code`, …)"),
    ("500", "`internal`: a bug; `inference_failed`: a model run failed; the request changed nothing"),
    ("503", "`store_unavailable`: the store cannot write (a full disk); `recovering`: the journal is being taken back from peers; `device_cloned`; `inference_busy` and other queue limits: try again"),
];

#[derive(OpenApi)]
#[openapi(
    info(title = "stallmesh node", description = "The HTTP API of a stallmesh node: one POS tablet of a market's mesh. Every error is `{\"error\": code, \"message\": text}`."),
    paths(
        catalogue::create_product, catalogue::list_products, catalogue::update_product, catalogue::attach_photo, catalogue::get_photo,
        stock::stock, stock::restock, stock::transfer,
        drops::plan_drop, drops::list_drops, drops::show_drop,
        sales::create_sale, sales::list_sales,
        search::search, search::search_image, search::recommendations, search::recommendation_lift,
        till::record_feedback, till::list_feedback, till::kpis, till::scan_card,
        session::show, session::sign_in, session::sign_out,
        status::status, status::healthz, status::metrics,
        mesh::mesh, mesh::arrivals, mesh::equivocations, mesh::revoke, mesh::push_changes, mesh::get_changes,
        loyalty::issue_card, loyalty::challenge, loyalty::show_card, loyalty::mint_vouchers, loyalty::list_vouchers,
        loyalty::redeem_voucher, loyalty::exposures,
        events::events,
        openapi_json,
    ),
    components(schemas(stallmesh_api::ErrorBody)),
    modifiers(&SharedErrors, &TillFlows),
)]
pub struct ApiDoc;

/// Adds [`SHARED_ERRORS`] to every operation, merged into the operation's own description of a
/// status when it has one.
struct SharedErrors;

impl Modify for SharedErrors {
    fn modify(&self, doc: &mut Document) {
        for item in doc.paths.paths.values_mut() {
            let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch, &mut item.head, &mut item.options];
            for op in ops.into_iter().flatten() {
                add_shared_errors(op);
            }
        }
    }
}

fn add_shared_errors(op: &mut Operation) {
    for (status, codes) in SHARED_ERRORS {
        match op.responses.responses.get_mut(*status) {
            Some(RefOr::T(own)) => own.description = format!("{}; or {codes}", own.description),
            _ => {
                let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
                let response = ResponseBuilder::new().description(*codes).content("application/json", body).build();
                op.responses.responses.insert(status.to_string(), RefOr::T(response));
            }
        }
    }
    // Every body an operation takes is required (a sale without one is refused).
    if let Some(body) = op.request_body.as_mut() {
        body.required = Some(utoipa::openapi::Required::True);
    }
}

/// The links a till follows (a product created is restocked, sold and edited; a restock is sold
/// from), so a stateful client such as schemathesis can walk them.
struct TillFlows;

impl Modify for TillFlows {
    fn modify(&self, doc: &mut Document) {
        use serde_json::json;
        use utoipa::openapi::link::LinkBuilder;
        let sku = "$response.body#/sku";
        let link = |op: &str| LinkBuilder::new().operation_id(op);
        let product_links = [
            ("RestockIt", link("restock").request_body(Some(json!({ "sku": sku, "qty": 5 }))).build()),
            ("SellIt", link("create_sale").request_body(Some(json!({ "lines": [{ "sku": sku }] }))).build()),
            ("UpdateIt", link("update_product").parameter("path.sku", sku).build()),
            ("PhotoOf", link("get_photo").parameter("path.sku", sku).build()),
        ];
        // The whole sale, not merged into a generated one: one unit of what was restocked sells.
        let sell_restocked = link("create_sale")
            .request_body(Some(json!({ "lines": [{ "sku": sku, "qty": 1 }] })))
            .extensions(Some([("x-schemathesis", json!({ "merge_body": false }))].into_iter().collect()))
            .build();
        let mut add = |path: &str, links: Vec<(&str, utoipa::openapi::link::Link)>| {
            let created = doc.paths.paths.get_mut(path).and_then(|item| item.post.as_mut()).and_then(|op| op.responses.responses.get_mut("201"));
            let Some(RefOr::T(created)) = created else { return };
            for (name, l) in links {
                created.links.insert(name.to_string(), RefOr::T(l));
            }
        };
        add("/api/v1/products", product_links.into_iter().collect());
        add("/api/v1/restocks", vec![("SellRestocked", sell_restocked)]);
    }
}

/// The document, built once.
pub fn document() -> &'static Document {
    static DOC: std::sync::OnceLock<Document> = std::sync::OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

/// The document as served: JSON, with each link's keys in OpenAPI's spelling (utoipa 5.5 writes a
/// link's `operationId` and `requestBody` as `operation_id` and `request_body`).
pub fn document_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| {
        let mut doc = serde_json::to_value(document()).expect("the OpenAPI document is JSON");
        respell_links(&mut doc);
        doc.to_string()
    })
}

fn respell_links(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(links)) = map.get_mut("links") {
                for link in links.values_mut().filter_map(Value::as_object_mut) {
                    for (from, to) in [("operation_id", "operationId"), ("operation_ref", "operationRef"), ("request_body", "requestBody")] {
                        if let Some(v) = link.remove(from) {
                            link.insert(to.to_string(), v);
                        }
                    }
                }
            }
            map.values_mut().for_each(respell_links);
        }
        Value::Array(items) => items.iter_mut().for_each(respell_links),
        _ => {}
    }
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "status", responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json", body = Object)))]
pub(super) async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented ranges of query numbers are the limits the handlers enforce.
    #[test]
    fn documented_query_maxima_are_the_enforced_limits() {
        let doc: serde_json::Value = serde_json::from_str(document_json()).unwrap();
        let maximum = |path: &str, name: &str| -> u64 {
            let params = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
            let p = params.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{path} {name}"));
            p["schema"]["maximum"].as_u64().unwrap_or_else(|| panic!("{path} {name}: {p}"))
        };
        assert_eq!(maximum("/api/v1/sales", "limit"), super::super::MAX_SALES_LISTED as u64);
        assert_eq!(maximum("/api/v1/changes", "limit"), super::super::MAX_CHANGES_PER_REQUEST as u64);
        assert_eq!(maximum("/api/v1/search", "k"), stallmesh_inference::search::MAX_RESULTS as u64);
        assert_eq!(maximum("/api/v1/recommendations", "k"), stallmesh_inference::search::MAX_RESULTS as u64);
        assert_eq!(maximum("/api/v1/kpis", "since_ms"), super::super::MAX_TIME_MS);
        assert_eq!(maximum("/api/v1/recommendations/feedback", "limit"), super::super::till::MAX_FEEDBACK_LISTED as u64);
    }
}
