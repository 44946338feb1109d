use std::collections::HashMap;

use super::*;

fn td() -> TrustDomain {
    "example.org".parse().expect("td")
}

fn values(pairs: &[(&str, &str)]) -> impl Fn(&Placeholder) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (format!("{{{k}}}"), v.to_string()))
        .collect();
    move |p: &Placeholder| map.get(&p.to_string()).cloned()
}

#[test]
fn renders_the_kubernetes_shape() {
    let t: SpiffeIdTemplate = "spiffe://{trustDomain}/ns/{k8s.namespace}/sa/{k8s.serviceAccount}"
        .parse()
        .expect("template");
    let id = t
        .render(
            &td(),
            values(&[("k8s.namespace", "payments"), ("k8s.serviceAccount", "api")]),
        )
        .expect("render");
    assert_eq!(id.as_str(), "spiffe://example.org/ns/payments/sa/api");
    let names: Vec<String> = t.placeholders().map(ToString::to_string).collect();
    assert_eq!(names, ["{k8s.namespace}", "{k8s.serviceAccount}"]);
}

#[test]
fn renders_other_placeholders() {
    let t: SpiffeIdTemplate =
        "spiffe://corp.example/host/uid-{uid}/{k8s.podLabels.app.kubernetes.io/name}.v{gid}"
            .parse()
            .expect("template");
    let id = t
        .render(
            &td(),
            values(&[
                ("uid", "1001"),
                ("gid", "7"),
                ("k8s.podLabels.app.kubernetes.io/name", "web"),
            ]),
        )
        .expect("render");
    // A literal trust domain wins over the agent's.
    assert_eq!(id.as_str(), "spiffe://corp.example/host/uid-1001/web.v7");
    // A template without placeholders is one fixed ID.
    let fixed: SpiffeIdTemplate = "spiffe://{trustDomain}/agents/payments"
        .parse()
        .expect("fixed");
    assert_eq!(
        fixed.render(&td(), |_| None).expect("render").as_str(),
        "spiffe://example.org/agents/payments"
    );
}

#[test]
fn values_that_cannot_be_segments_name_their_placeholder() {
    let t: SpiffeIdTemplate = "spiffe://{trustDomain}/svc/{systemdUnit}/{k8s.podName}"
        .parse()
        .expect("template");
    type Case = (&'static str, &'static str, SpiffeIdError, &'static str);
    let cases: &[Case] = &[
        // A template instance's `@` is not a path character.
        (
            "getty@tty1.service",
            "p",
            SpiffeIdError::PathChar('@'),
            "{systemdUnit}",
        ),
        (
            "a.service",
            "",
            SpiffeIdError::EmptySegment,
            "{k8s.podName}",
        ),
        (
            "a.service",
            "..",
            SpiffeIdError::DotSegment,
            "{k8s.podName}",
        ),
        (".", "p", SpiffeIdError::DotSegment, "{systemdUnit}"),
        (
            "a.service",
            "a/b",
            SpiffeIdError::PathChar('/'),
            "{k8s.podName}",
        ),
        (
            "a.service",
            "caf\u{e9}",
            SpiffeIdError::PathChar('\u{e9}'),
            "{k8s.podName}",
        ),
        (
            "a.service",
            "x%2F",
            SpiffeIdError::PathChar('%'),
            "{k8s.podName}",
        ),
        (
            "a b.service",
            "p",
            SpiffeIdError::PathChar(' '),
            "{systemdUnit}",
        ),
    ];
    for (unit, pod, problem, placeholder) in cases {
        let err = t
            .render(
                &td(),
                values(&[("systemdUnit", unit), ("k8s.podName", pod)]),
            )
            .expect_err("invalid value");
        match &err {
            RenderError::Value {
                placeholder: p,
                problem: got,
                ..
            } => {
                assert_eq!(p.to_string(), *placeholder, "{unit} {pod}");
                assert_eq!(got, problem, "{unit} {pod}");
            }
            other => panic!("{unit} {pod}: {other:?}"),
        }
        assert!(err.to_string().contains(placeholder), "{err}");
    }
    // `.` inside a longer segment is fine: only a whole `.`/`..` segment is refused.
    let dotted: SpiffeIdTemplate = "spiffe://{trustDomain}/v{k8s.podName}".parse().expect("t");
    assert_eq!(
        dotted
            .render(&td(), values(&[("k8s.podName", "..")]))
            .expect("render")
            .as_str(),
        "spiffe://example.org/v.."
    );
}

#[test]
fn missing_values_and_overlong_ids() {
    let t: SpiffeIdTemplate = "spiffe://{trustDomain}/ns/{k8s.namespace}"
        .parse()
        .expect("t");
    let err = t.render(&td(), |_| None).expect_err("missing");
    assert_eq!(
        err,
        RenderError::Missing {
            placeholder: Placeholder::Namespace
        }
    );
    assert_eq!(
        err.to_string(),
        "{k8s.namespace} has no value for this process"
    );
    let long = "a".repeat(MAX_LEN_PAD);
    let err = t
        .render(&td(), values(&[("k8s.namespace", &long)]))
        .expect_err("too long");
    assert_eq!(err, RenderError::Invalid(SpiffeIdError::TooLong));
}

const MAX_LEN_PAD: usize = super::super::MAX_SPIFFE_ID_LEN;

#[test]
fn malformed_templates() {
    let cases: &[(&str, TemplateError)] = &[
        ("http://{trustDomain}/a", TemplateError::WrongScheme),
        (
            "spiffe://{trustDomain}/a/{k8s.namespace",
            TemplateError::Unclosed(25),
        ),
        ("spiffe://{trustDomain}/a}", TemplateError::Unopened(24)),
        (
            "spiffe://{trustDomain}/{nope}",
            TemplateError::Unknown("nope".into()),
        ),
        (
            "spiffe://{trustDomain}/{}",
            TemplateError::Unknown(String::new()),
        ),
        (
            "spiffe://{trustDomain}/{k8s.podLabels.}",
            TemplateError::Unknown("k8s.podLabels.".into()),
        ),
        (
            "spiffe://{trustDomain}/{trustDomain}",
            TemplateError::TrustDomainInPath,
        ),
        (
            "spiffe://{k8s.namespace}.org/a",
            TemplateError::TrustDomainPlaceholder("{k8s.namespace}".into()),
        ),
        (
            "spiffe://x{trustDomain}/a",
            TemplateError::TrustDomainPlaceholder("{trustDomain}".into()),
        ),
        (
            "spiffe://Example.org/a",
            TemplateError::Invalid(SpiffeIdError::TrustDomainChar('E')),
        ),
        (
            "spiffe://{trustDomain}/a//{uid}",
            TemplateError::Invalid(SpiffeIdError::EmptySegment),
        ),
        (
            "spiffe://{trustDomain}/{uid}/",
            TemplateError::Invalid(SpiffeIdError::EmptySegment),
        ),
        (
            "spiffe://{trustDomain}/../{uid}",
            TemplateError::Invalid(SpiffeIdError::DotSegment),
        ),
        (
            "spiffe://{trustDomain}/a?{uid}",
            TemplateError::Invalid(SpiffeIdError::Query),
        ),
        (
            "spiffe://{trustDomain}/a*{uid}",
            TemplateError::Invalid(SpiffeIdError::PathChar('*')),
        ),
    ];
    for (text, want) in cases {
        assert_eq!(
            text.parse::<SpiffeIdTemplate>().as_ref(),
            Err(want),
            "{text}"
        );
    }
}
