//! `/docs`: the interactive API page, its assets served from the binary, and
//! the OpenAPI document it reads describing the tool and structured-output
//! fields.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use vicugna_serve::ControllerOptions;

async fn get(url: &str) -> (u16, String, String) {
    let r = http().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ctype, r.text().await.unwrap())
}

/// The values of `attr="…"` in `html`.
fn attr_values(html: &str, attr: &str) -> Vec<String> {
    let needle = format!("{attr}=\"");
    html.split(&needle)
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_page_and_assets_are_served_without_a_key_or_the_web_page() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (c, _tc) = controller(ControllerOptions {
            control: control(),
            ..ControllerOptions::default()
        })
        .await;
        // An API with keys and without the chat page: /docs is still there,
        // and reading it needs no key (sending requests from it does).
        let (api, _tg) = gateway(&c, |o| {
            o.api_keys = Some(vec!["sk-docs".into()]);
            o.web.enabled = false;
        })
        .await;
        let (status, ctype, html) = get(&format!("{api}/docs")).await;
        assert_eq!(status, 200, "{html}");
        assert!(ctype.starts_with("text/html"), "{ctype}");
        assert!(html.contains("<title>vicugna API</title>"), "{html}");
        assert!(
            html.contains("/openapi.json"),
            "the page reads the OpenAPI document: {html}"
        );
        // Every script and stylesheet comes from this server, none from a CDN.
        let assets: Vec<String> = attr_values(&html, "src")
            .into_iter()
            .chain(
                attr_values(&html, "href")
                    .into_iter()
                    .filter(|h| h.starts_with("/docs/")),
            )
            .collect();
        assert!(assets.iter().any(|a| a.ends_with(".js")), "{assets:?}");
        assert!(assets.iter().any(|a| a.ends_with(".css")), "{assets:?}");
        for a in &assets {
            assert!(a.starts_with('/'), "asset {a} is not served by vicugna");
            let (status, ctype, text) = get(&format!("{api}{a}")).await;
            assert_eq!(status, 200, "{a}");
            let want = if a.ends_with(".js") {
                "text/javascript"
            } else {
                "text/css"
            };
            assert!(ctype.starts_with(want), "{a}: {ctype}");
            assert!(!text.contains("://"), "{a} loads nothing from elsewhere");
        }
        let (_, _, js) = get(&format!("{api}/docs/docs.js")).await;
        assert!(js.contains("fetch(\"/openapi.json\")") && js.contains("Send"), "{js}");
        assert!(
            !js.contains("innerHTML"),
            "the document's text is never inserted as HTML"
        );
        let (status, _, _) = get(&format!("{api}/openapi.json")).await;
        assert_eq!(status, 200);
    })
    .await
    .expect("the test took too long");
}

#[test]
fn openapi_names_tools_and_structured_output_fields() {
    let doc = vicugna_serve::gateway::openapi::document();
    let schemas = &doc["components"]["schemas"];
    let chat = &schemas["ChatCompletionRequest"]["properties"];
    for field in ["tools", "tool_choice", "response_format", "logit_bias", "min_p"] {
        assert!(chat[field].is_object(), "chat requests describe {field}");
    }
    let completion = &schemas["CompletionRequest"]["properties"];
    for field in ["response_format", "logit_bias", "min_p"] {
        assert!(completion[field].is_object(), "completion requests describe {field}");
    }
    let choices: Vec<Value> = chat["tool_choice"]["anyOf"][0]["enum"].as_array().unwrap().clone();
    assert_eq!(choices, ["none", "auto", "required"]);
    assert_eq!(chat["tools"]["items"]["properties"]["function"]["required"][0], "name");
    let formats = chat["response_format"]["anyOf"].as_array().unwrap();
    assert!(formats
        .iter()
        .any(|f| f["properties"]["type"]["enum"][0] == "json_schema"
            && f["properties"]["json_schema"]["properties"]["strict"]["type"] == "boolean"));
    let roles = chat["messages"]["items"]["properties"]["role"]["enum"]
        .as_array()
        .unwrap();
    assert!(roles.iter().any(|r| r == "tool"));
    assert!(chat["messages"]["items"]["properties"]["tool_call_id"].is_object());
    assert_eq!(chat["logit_bias"]["additionalProperties"]["maximum"], 100);
    assert!(doc["paths"]["/docs"]["get"].is_object());
}
